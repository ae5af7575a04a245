"""What the HTTP API's endpoints share: their constants, the JSON errors, the context on
``request.app.state`` (:class:`ApiContext`), the door every request goes through (scopes,
tokens, cross-site refusals, store failures) and the readers of request bodies and query
strings. The endpoints are in :mod:`postlane.ingest.http` (messages, the queue, probes) and
:mod:`postlane.ingest.http_feeds` (suppressions, events, reports, webhooks)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from postlane.app import AsyncPostlane
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
    sender_refusal,
)
from postlane.config import Config
from postlane.cursors import Page
from postlane.errors import (
    IdempotencyConflict,
    MessageTooLarge,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    SuppressedRecipients,
    ValidationError,
)
from postlane.ingest.bodies import (
    JSON_TYPES,
    ApiError,
    RequestBudget,
    Reservation,
    parse_json,
    require_media_type,
)
from postlane.ingest.bodies import read_body as read_within
from postlane.ingest.server import HttpLimits, Refusals, escaped_store_error
from postlane.message import Message, PreparedMessage, sender_domains
from postlane.metrics import Metrics
from postlane.mime import Attachment
from postlane.records import Selector
from postlane.selectors import (
    SELECTOR_FIELDS,
    metadata_pairs,
    optional_string,
    parse_selector,
    string_list,
)
from postlane.toml_values import is_decimal

if TYPE_CHECKING:
    from postlane.ingest.door import FrontDoor
    from postlane.supervisor import ProcessSlot
    from postlane.worker import Worker


log = logging.getLogger("postlane.http")
T = TypeVar("T")

MAX_BATCH = 1000
#: a batch's body is at most this many times a message's
BATCH_BODIES = 4
MAX_LIST = 1000
#: the suppression list answers up to this many entries a page (and that many by default)
MAX_SUPPRESSION_PAGE = 10_000
#: the header naming the next page's cursor (also in ``Link: <...>; rel="next"``)
NEXT_CURSOR = "X-Next-Cursor"
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
#: the fields of an attachment in a message's JSON
_ATTACHMENT_FIELDS = ("filename", "content", "content_type")
#: the fields of a batch's JSON object
_BATCH_FIELDS = ("messages",)
#: query parameters that may repeat (a list); the others take their last value
_REPEATABLE = ("ids", "lane", "state", "domain", "class")


# -- errors --------------------------------------------------------------------------------------


class ApiJSON(JSONResponse):
    """A JSON answer that renders whatever a store holds: a value strict JSON cannot carry (a
    NaN, a lone surrogate, kept by an older version that let them in) is written as null or
    as an escape, not a 500 on every later read. Browsers are told not to guess its type
    (``nosniff``): an answer that repeats what a request said (an unknown path) is never read
    as a page."""

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        super().init_headers(headers)
        self.raw_headers.append((b"x-content-type-options", b"nosniff"))

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
    if isinstance(exc, SuppressedRecipients):  # nothing requeued; the body names them
        named = {"code": exc.code, "message": exc.message, "addresses": list(exc.addresses)}
        return ApiJSON({"error": named}, status_code=409)
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
def invalid_field() -> Iterator[None]:
    """A field of the wrong shape is a 400 ``invalid_field`` (not a refused message's 422)."""
    try:
        yield
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message) from None


def too_many_attempts(exc: TooManyAttempts, what: str) -> ApiError:
    """The 429 of a client that failed too often lately (``what``: what it got wrong)."""
    return ApiError(
        429,
        "too_many_attempts",
        f"too many {what} from this client: retry after {exc.retry_after} s",
        {"Retry-After": str(exc.retry_after)},
    )


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
    #: which of ``serve --processes N``'s processes this is (None: serve alone)
    process: ProcessSlot | None = None

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
            "Wrong tokens, by door (api: a bearer token; dashboard; login: the login form; "
            "webhook: a provider webhook's signature or password)",
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


_DOORS = ("api", "dashboard", "login", "webhook")


def install(
    state: State,
    door: FrontDoor,
    limits: HttpLimits | None = None,
    process: ProcessSlot | None = None,
) -> ApiContext:
    """Give the API's endpoints, wherever they are mounted, what they need."""
    limits = limits or HttpLimits.from_config(door.config)
    body_limit = int(door.config.smtp.max_size * JSON_OVERHEAD) + 64 * 1024
    export_limit = max(EXPORT_BYTES, 2 * body_limit)
    largest = max(BATCH_BODIES * body_limit, export_limit)
    api = ApiContext(
        postlane=door.app,
        config=door.config,
        tokens=Tokens.from_config(door.config.http, clock=door.app.clock.now),
        metrics=door.metrics,
        worker=door.worker,
        body_limit=body_limit,
        export_limit=export_limit,
        limits=limits,
        budget=RequestBudget(limits.request_bytes or largest + body_limit),
        process=process,
    )
    if door.metrics is not None:
        with contextlib.suppress(ValueError):  # already counted (one registry, two apps)
            door.metrics.add_tallies(_DoorMetrics(api))
    state.api = api
    return api


def context_of(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.api)


Handler = Callable[[Request, Caller], Awaitable[Response]]
#: where a request's hold on the request budget is kept (its ASGI scope)
_RESERVATION = "postlane.reservation"


def endpoint(handler: Handler, scope: Scope | None) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint running ``handler`` for a caller with ``scope`` (None: anyone),
    answering every refusal and :class:`PostlaneError` as a JSON error."""

    async def run(request: Request) -> Response:
        reservation = Reservation(context_of(request).budget)
        request.scope[_RESERVATION] = reservation
        try:
            return await handler(request, _caller(request, scope))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except StoreUnavailable as exc:
            context_of(request).store_health.failed(exc.message)
            return _postlane_error(exc)
        except PostlaneError as exc:
            return _postlane_error(exc)
        except Exception as exc:
            failure = escaped_store_error(exc)
            if failure is None:
                raise
            log.exception("the store let a driver error through on %s", request.url.path)
            context_of(request).store_health.failed(failure.message)
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
        caller = context_of(request).tokens.caller(request)
    except TooManyAttempts as exc:
        raise too_many_attempts(exc, "wrong tokens") from None
    except Refused as exc:
        raise ApiError(*_REFUSALS[type(exc)]) from None
    if scope is Scope.ADMIN and caller.scope is not Scope.ADMIN:
        raise ApiError(403, "forbidden", "this needs a token with the admin scope")
    return caller


def check_sender(caller: Caller, message: PreparedMessage) -> None:
    """Refuse (403 ``sender_not_allowed``) a message from a domain the caller's token is not
    bound to (``[http] send_tokens`` with ``senders``)."""
    refusal = sender_refusal(caller.senders, sender_domains(message))
    if refusal is not None:
        raise ApiError(403, "sender_not_allowed", f"this token {refusal}")


# -- reading requests ------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytearray:
    """The request body within ``limit`` bytes, the body timeout and the request budget."""
    return await read_within(
        request,
        limit,
        reservation=cast(Reservation, request.scope[_RESERVATION]),
        timeout=context_of(request).limits.body_timeout,
    )


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: ``application/json``, strict JSON (no NaN or Infinity, no number too
    large for a float, no lone surrogate), nesting no deeper than Python's recursion limit."""
    require_media_type(request, JSON_TYPES)
    return parse_json(await read_body(request, limit))


#: fields of other APIs (postlane's Python API, Django's, other providers') that a message
#: sent as JSON names otherwise: the refusal names the field meant
_MESSAGE_FIELD_ALIASES = {
    "sender": "from",
    "from_email": "from",
    "frm": "from",
    "recipients": "to",
    "recipient_list": "to",
    "body": "text",
    "html_message": "html",
}


def refuse_unknown_fields(given: Any, known: Collection[str], what: str = "field") -> None:
    """Refuse (400 ``unknown_field``) a key of ``given`` not in ``known``, with the known key it
    is closest to (or, for a message, the field another API's name stands for: ``sender`` is
    ``from``): a typo is not silently dropped."""
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        alias = _MESSAGE_FIELD_ALIASES.get(str(unknown[0]))
        near = (
            [alias]
            if alias in known
            else difflib.get_close_matches(str(unknown[0]), sorted(known), n=1)
        )
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ApiError(400, "unknown_field", f"unknown {what} {unknown[0]!r}{hint}")


def message_from_json(data: Any, idempotency_header: str | None = None) -> Message:
    """A :class:`Message` from the API's JSON shape (raises :class:`ApiError` on bad shapes;
    the message itself is validated when it is prepared). An optional field may be null (as
    if absent), never a value of another type (``"headers": []`` is refused, not read as none)."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_field", "a message must be a JSON object")
    refuse_unknown_fields(data, _MESSAGE_FIELDS)
    headers = data.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ApiError(
            400, "invalid_field", "headers must be an object of strings (a name to its value)"
        )
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(400, "invalid_field", "metadata must be an object")
    attachments = _attachments(data.get("attachments"))
    with invalid_field():
        key = optional_string(data.get("idempotency_key"), "idempotency_key")
        if key and idempotency_header and key != idempotency_header:
            raise ApiError(
                400,
                "invalid_field",
                "the Idempotency-Key header and the body's idempotency_key differ: give one, "
                "or the same in both",
            )
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
            send_at=time_field(data.get("send_at"), "send_at"),
            expires_at=time_field(data.get("expires_at"), "expires_at"),
        )


def refuse_batch_idempotency_header(request: Request) -> None:
    """A batch takes no ``Idempotency-Key`` header (400): one key cannot name many messages,
    and each message of a batch takes its own ``idempotency_key``."""
    if "idempotency-key" in request.headers:
        raise ApiError(
            400,
            "invalid_field",
            "a batch takes no Idempotency-Key header: give each message of the batch its own "
            "idempotency_key",
        )


def batch_from_json(data: Any) -> list[Any]:
    """The messages of a batch's JSON (``{"messages": [...]}``, or the bare list), each still
    JSON; any other key of the object is refused, as a message's unknown fields are."""
    if isinstance(data, dict):
        refuse_unknown_fields(data, _BATCH_FIELDS)
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise ApiError(
            400, "invalid_field", f'send {{"messages": [...]}} with 1 to {MAX_BATCH} messages'
        )
    if len(data) > MAX_BATCH:
        raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} messages per batch")
    return data


def time_field(value: Any, what: str) -> str | float | None:
    """``send_at``/``expires_at`` as JSON gives them: ISO 8601 text or Unix seconds (the
    message checks the rest)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value  # an int past any float's range is the message's to refuse, not a 500
    raise ApiError(400, "invalid_field", f"{what} must be ISO 8601 text or Unix seconds")


def _attachments(items: Any) -> list[Attachment]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ApiError(
            400,
            "invalid_field",
            "attachments must be a list of {filename, content (base64), content_type} objects",
        )
    return [_attachment(item) for item in items]


def _attachment(item: Any) -> Attachment:
    """One attachment of a message's JSON; filename and content_type may be left out (or null):
    ``attachment`` and ``application/octet-stream``."""
    if not isinstance(item, dict) or not isinstance(item.get("content"), str):
        raise ApiError(
            400,
            "invalid_field",
            "each attachment is {filename, content (base64), content_type}",
        )
    refuse_unknown_fields(item, _ATTACHMENT_FIELDS, "attachment field")
    filename = item.get("filename")
    content_type = item.get("content_type")
    for value, name in ((filename, "filename"), (content_type, "content_type")):
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "invalid_field", f"an attachment's {name} must be a string")
    try:
        content = base64.b64decode(item["content"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_field", "attachment content must be base64") from None
    return Attachment(
        filename=filename or "attachment",
        content=content,
        content_type=content_type or "application/octet-stream",
    )


def selector_of(request: Request, fields: dict[str, Any]) -> Selector:
    """A selector from JSON (or query parameters): every field narrows."""
    try:
        return parse_selector(fields, context_of(request).postlane.clock)
    except ValidationError as exc:
        code = "invalid_field" if exc.field in SELECTOR_FIELDS else "unknown_field"
        raise ApiError(400, code, exc.message) from None


def query_selector(request: Request, *, paged: bool = False) -> tuple[Selector, int]:
    """The selector and the limit of a listing's query string (``paged``: the listing also
    takes ``cursor``, read by :func:`query_cursor`; elsewhere it is an unknown field)."""
    params: dict[str, Any] = {}
    for key in request.query_params:
        if key == "limit" or (paged and key == "cursor"):
            continue
        values = request.query_params.getlist(key)
        params[key] = values if key in _REPEATABLE else values[-1]
    if "all" in params:
        params["all"] = params["all"] in ("1", "true", "yes")
    if "metadata" in params:  # ?metadata=order%3D8812&metadata=tenant%3Dacme, as the CLI takes it
        try:
            params["metadata"] = metadata_pairs(request.query_params.getlist("metadata"))
        except ValidationError as exc:
            raise ApiError(400, "invalid_field", exc.message) from None
    limit = query_limit(request, default=100, most=MAX_LIST)
    return selector_of(request, params), limit


def query_limit(request: Request, *, default: int, most: int) -> int:
    """A listing's ``limit``: 1 to ``most``, ``default`` when not given."""
    text = request.query_params.get("limit", str(default))
    if not is_decimal(text) or not 1 <= int(text) <= most:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {most}")
    return int(text)


def query_cursor(request: Request) -> str | None:
    """A paged listing's ``cursor`` (None: the first page). An empty one is refused, not read
    as the first page: a script that passes on a missing next cursor must not start over."""
    cursor = request.query_params.get("cursor")
    if cursor is not None and not cursor:
        raise ApiError(
            400,
            "invalid_field",
            "cursor is empty: pass the cursor a page gave (X-Next-Cursor), or leave cursor out "
            "for the first page",
        )
    return cursor


async def read_page(fetch: Awaitable[Page[T]]) -> Page[T]:
    """A page of a listing; a cursor it did not give is a 400 ``invalid_field`` naming it."""
    with invalid_field():
        return await fetch


def page_response(request: Request, page: Page[Any]) -> ApiJSON:
    """A page as the listing's JSON array (the shape it always had), and where the next page
    starts: ``Link: <...>; rel="next"`` (this request with the next ``cursor``) and
    ``X-Next-Cursor``. The last page has neither."""
    headers: dict[str, str] = {}
    if page.next_cursor is not None:
        url = request.url.include_query_params(cursor=page.next_cursor)
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        headers[NEXT_CURSOR] = page.next_cursor
    return ApiJSON([item.as_json() for item in page.items], headers=headers)


def body_flag(data: dict[str, Any], name: str) -> bool:
    value = data.pop(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_field", f"{name} must be true or false")
    return value
