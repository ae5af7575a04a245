"""The HTTP API (Starlette on uvicorn): enqueue, read, operate, stats, metrics, health.

Bearer tokens carry a scope. ``[http] tokens`` (and ``$POSTLANE_API_TOKEN``) are ``admin``:
everything, operations included. ``[http] send_tokens`` are ``send``: enqueue, and read back
the messages that token enqueued. With no token configured at all the API answers only clients
on loopback (with every scope). ``/metrics`` and ``/healthz`` need no token, so a Prometheus
scraper and a load balancer can reach them. The API describes itself at ``/openapi.json``.

Errors are ``{"error": {"code", "message"}}`` with a 4xx status (503 when the store is down),
and a refused request stores nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from postlane.app import AsyncPostlane, QueueAction, check_export
from postlane.classify import ReplyClass
from postlane.config import Config, parse_duration, parse_listen
from postlane.errors import (
    ConfigError,
    MessageTooLarge,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    ValidationError,
)
from postlane.ingest.openapi import openapi_document
from postlane.message import Attachment, Lane, Message, RecipientState
from postlane.metrics import Metrics
from postlane.records import Selector

log = logging.getLogger("postlane.http")

MAX_BATCH = 1000
MAX_LIST = 1000
#: an exported delete or purge over HTTP takes at most this many recipients (one slice: it is
#: exported and deleted in one go); more is a job for `postlane queue delete --export`
MAX_EXPORT_RECIPIENTS = 1000
#: an export (and so an import) body is at most this large, and at least two messages of
#: max_size (JSON and base64 included)
EXPORT_BYTES = 64 * 1024 * 1024
NDJSON = "application/x-ndjson"
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
}
_SELECTOR_FIELDS = {
    "ids",
    "all",
    "lane",
    "state",
    "domain",
    "class",
    "older_than",
    "sender",
    "recipient",
    "metadata",
}


_QUEUE_ACTIONS = (QueueAction.FLUSH, QueueAction.HOLD, QueueAction.RELEASE, QueueAction.DELETE)
_DLQ_ACTIONS = (QueueAction.REQUEUE, QueueAction.PURGE)
#: the actions that can answer with what they removed (``"export": true``)
_EXPORTING = (QueueAction.DELETE, QueueAction.PURGE)


class Scope(StrEnum):
    SEND = "send"
    ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class Caller:
    scope: Scope
    #: recorded with what this caller enqueues: a token's fingerprint, never the token
    submitter: str | None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _is_loopback(request: Request) -> bool:
    return is_loopback_host(request.client.host if request.client else "")


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (a peer on this machine)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def addressed_locally(request: Request) -> bool:
    """The request names this machine in its Host header (``localhost``, a loopback address,
    any port). Without tokens, a loopback peer is trusted only then: a web page whose name an
    attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host, not these."""
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name == "localhost" or name.endswith(".localhost") or is_loopback_host(name)


def fingerprint(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


class Tokens:
    def __init__(self, admin: tuple[str, ...], send: tuple[str, ...]) -> None:
        self._known = [(t.encode(), Scope.ADMIN) for t in admin] + [
            (t.encode(), Scope.SEND) for t in send
        ]

    def scope_of(self, token: str) -> Scope | None:
        """The scope of a token, or None for an unknown one."""
        found: Scope | None = None
        for known, scope in self._known:  # compare with every token: no timing hint
            if hmac.compare_digest(token.encode(), known):
                found = scope
        return found

    def caller(self, request: Request) -> Caller:
        if not self._known:
            if not _is_loopback(request) or not addressed_locally(request):
                raise ApiError(
                    403,
                    "forbidden",
                    "no API token is configured: the API answers only loopback clients "
                    "addressing it as localhost or 127.0.0.1",
                )
            return Caller(Scope.ADMIN, None)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
        found = self.scope_of(token)
        if found is None:
            raise ApiError(401, "unauthorized", "the token is not valid")
        return Caller(found, fingerprint(token))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "message_too_large", f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(413, "message_too_large", f"the request body is over {limit} bytes")
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ApiError(400, "invalid_field", f"{name} must be a string or a list of strings")


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{name} must be a string")
    return value


def message_from_json(data: Any, idempotency_header: str | None = None) -> Message:
    """A :class:`Message` from the API's JSON shape (raises :class:`ApiError` on bad shapes)."""
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
    attachments = []
    raw_attachments = data.get("attachments") or []
    if not isinstance(raw_attachments, list):
        raise ApiError(400, "invalid_field", "attachments must be a list")
    for item in raw_attachments:
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
    key = _optional_str(data, "idempotency_key") or idempotency_header
    return Message(
        sender=_optional_str(data, "from") or "",
        to=_strings(data.get("to"), "to"),
        cc=_strings(data.get("cc"), "cc"),
        bcc=_strings(data.get("bcc"), "bcc"),
        subject=_optional_str(data, "subject"),
        text=_optional_str(data, "text"),
        html=_optional_str(data, "html"),
        headers=headers,
        attachments=attachments,
        raw=_optional_str(data, "raw"),
        lane=_optional_str(data, "lane") or "normal",
        idempotency_key=key,
        metadata=metadata,
    )


def _enum_list(values: list[str], enum: type[StrEnum], name: str) -> tuple[Any, ...]:
    try:
        return tuple(enum(v.lower()) for v in values)
    except ValueError:
        known = ", ".join(e.value for e in enum)
        raise ApiError(400, "invalid_field", f"{name}: one of {known}") from None


def selector_from(data: dict[str, Any]) -> Selector:
    """A selector from JSON (or query parameters): every field narrows."""
    unknown = sorted(set(data) - _SELECTOR_FIELDS)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown selector {unknown[0]!r}")
    older = _optional_str(data, "older_than")
    older_than = None
    if older is not None:
        try:
            import time

            older_than = time.time() - parse_duration(older)
        except ValueError as exc:
            raise ApiError(400, "invalid_field", f"older_than: {exc}") from None
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ApiError(400, "invalid_field", "metadata must be an object of strings")
    all_ = data.get("all", False)
    if not isinstance(all_, bool):
        raise ApiError(400, "invalid_field", "all must be true or false")
    return Selector(
        ids=tuple(_strings(data.get("ids"), "ids")),
        all=all_,
        lanes=_enum_list(_strings(data.get("lane"), "lane"), Lane, "lane"),
        states=_enum_list(_strings(data.get("state"), "state"), RecipientState, "state"),
        domains=tuple(d.lower() for d in _strings(data.get("domain"), "domain")),
        classes=_enum_list(_strings(data.get("class"), "class"), ReplyClass, "class"),
        older_than=older_than,
        sender=_optional_str(data, "sender"),
        recipient=_optional_str(data, "recipient"),
        metadata=metadata,
    )


def _query_selector(request: Request) -> tuple[Selector, int]:
    params: dict[str, Any] = {}
    for key in request.query_params:
        if key == "limit":
            continue
        values = request.query_params.getlist(key)
        params[key] = values if key in ("ids", "lane", "state", "domain", "class") else values[-1]
    if "all" in params:
        params["all"] = params["all"] in ("1", "true", "yes")
    limit_text = request.query_params.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_LIST}")
    return selector_from(params), int(limit_text)


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.pop(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_field", f"{name} must be true or false")
    return value


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


def _postlane_error(exc: PostlaneError) -> JSONResponse:
    if isinstance(exc, MessageTooLarge):
        return error_response(413, exc.code, exc.message)
    if isinstance(exc, ValidationError):
        return error_response(422, exc.code, exc.message)
    if isinstance(exc, NotFound):
        return error_response(404, exc.code, exc.message)
    if isinstance(exc, StoreUnavailable):
        return error_response(503, exc.code, exc.message)
    return error_response(400, exc.code, exc.message)


Handler = Callable[[Request, Caller], Awaitable[Response]]


def build_app(
    config: Config,
    app: AsyncPostlane,
    metrics: Metrics | None = None,
    worker: Any = None,
    *,
    probes_only: bool = False,
) -> Starlette:
    """The Starlette application (tests drive it with httpx's ASGI transport). With
    ``probes_only`` (``postlane worker --metrics``): /metrics, /healthz and /readyz only."""
    tokens = Tokens(config.http.tokens, config.http.send_tokens)
    body_limit = int(config.smtp.max_size * JSON_OVERHEAD) + 64 * 1024
    export_limit = max(EXPORT_BYTES, 2 * body_limit)

    def endpoint(handler: Handler, scope: Scope | None) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                caller = tokens.caller(request) if scope is not None else Caller(Scope.ADMIN, None)
                if scope is Scope.ADMIN and caller.scope is not Scope.ADMIN:
                    raise ApiError(403, "forbidden", "this needs a token with the admin scope")
                return await handler(request, caller)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message)
            except PostlaneError as exc:
                return _postlane_error(exc)

        return run

    async def post_message(request: Request, caller: Caller) -> Response:
        data = await read_json(request, body_limit)
        message = message_from_json(data, request.headers.get("idempotency-key"))
        prepared = dataclasses.replace(app.prepare(message), submitter=caller.submitter)
        [result] = await app.send_prepared([prepared])
        if metrics is not None and not result.duplicate:
            metrics.enqueued.labels("http").inc()
        return JSONResponse(result.as_json(), status_code=202)

    async def post_batch(request: Request, caller: Caller) -> Response:
        data = await read_json(request, body_limit * 4)
        items = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(items, list) or not items:
            raise ApiError(400, "invalid_field", 'send {"messages": [...]} with 1 to 1000 messages')
        if len(items) > MAX_BATCH:
            raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} messages per batch")
        results: list[dict[str, Any] | None] = [None] * len(items)
        prepared = []
        positions = []
        for index, item in enumerate(items):
            try:
                prepared.append(
                    dataclasses.replace(
                        app.prepare(message_from_json(item)), submitter=caller.submitter
                    )
                )
                positions.append(index)
            except (ApiError, PostlaneError) as exc:
                results[index] = {"error": {"code": exc.code, "message": exc.message}}
        if prepared:
            stored = await app.send_prepared(prepared)  # one durable commit for all of them
            for index, result in zip(positions, stored, strict=True):
                results[index] = result.as_json()
            if metrics is not None:
                metrics.enqueued.labels("http").inc(sum(1 for r in stored if not r.duplicate))
        accepted = len(prepared)
        return JSONResponse(
            {"accepted": accepted, "refused": len(items) - accepted, "results": results},
            status_code=202 if accepted == len(items) else 207,
        )

    async def get_message(request: Request, caller: Caller) -> Response:
        view = await app.get(request.path_params["queue_id"], history=True)
        if caller.scope is Scope.SEND and view.submitter != caller.submitter:
            raise NotFound(f"no message with id {view.id}")  # not yours: as if it did not exist
        return JSONResponse(view.as_json())

    async def list_messages(request: Request, caller: Caller) -> Response:
        selector, limit = _query_selector(request)
        views = await app.messages(selector, limit=limit)
        return JSONResponse([v.as_json() for v in views])

    async def get_stats(request: Request, caller: Caller) -> Response:
        return JSONResponse((await app.stats()).as_json())

    async def post_action(request: Request, caller: Caller) -> Response:
        allowed = _DLQ_ACTIONS if request.url.path.startswith("/v1/dlq/") else _QUEUE_ACTIONS
        try:
            action = QueueAction(request.path_params["action"])
            if action not in allowed:
                raise ValueError(action)
        except ValueError:
            known = ", ".join(a.value for a in allowed)
            raise ApiError(
                404, "not_found", f"no action {request.path_params['action']!r} ({known})"
            ) from None
        data = await read_json(request, 1024 * 1024)
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_field", "send a selector object")
        dry_run = _flag(data, "dry_run")
        export = _flag(data, "export")
        if export and action not in _EXPORTING:
            raise ApiError(400, "invalid_field", "export applies to delete and purge")
        selector = selector_from(data)
        if not selector.ids and not selector.all and action is not QueueAction.FLUSH:
            raise ApiError(400, "invalid_field", 'give "ids" or "all": true (selectors narrow)')
        counts = await app.summarize(action, selector)
        if dry_run:
            return JSONResponse({"would_touch": [c.as_json() for c in counts]})
        if export:
            return await exported(action, selector, sum(c.count for c in counts))
        count = await app.act(action, selector)
        return JSONResponse({"action": action.value, "count": count})

    async def exported(action: QueueAction, selector: Selector, selected: int) -> Response:
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
        buffer = _ExportBuffer(export_limit)
        removed = 0  # how much of the buffer describes slices already deleted

        def slice_done(_: int) -> None:
            nonlocal removed
            removed = buffer.size

        try:
            count = await app.act(
                action,
                selector,
                export=buffer,
                progress=slice_done,
                slice_size=MAX_EXPORT_RECIPIENTS,
            )
        except Exception:
            if removed:
                try:
                    await app.import_(buffer.getvalue()[:removed].split("\n"), batch_size=None)
                except Exception:
                    log.exception("an exported %s failed and could not be undone", action.value)
                    raise
            raise
        return Response(
            buffer.getvalue(),
            media_type=NDJSON,
            headers={"X-Postlane-Count": str(count)},
        )

    async def import_export(request: Request, caller: Caller) -> Response:
        """`postlane queue import` over HTTP: every line is checked before anything is stored,
        then all are stored in one transaction."""
        body = await read_body(request, export_limit)
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
        restored = await app.import_(lines, batch_size=None)
        return JSONResponse({"records": records, "imported": restored})

    async def list_dead(request: Request, caller: Caller) -> Response:
        selector, limit = _query_selector(request)
        letters = await app.dead_letters(selector, limit=limit)
        return JSONResponse([d.as_json() for d in letters])

    async def dead_groups(request: Request, caller: Caller) -> Response:
        selector, limit = _query_selector(request)
        groups = await app.dead_groups(selector, limit=limit)
        return JSONResponse([g.as_json() for g in groups])

    async def list_suppressions(request: Request, caller: Caller) -> Response:
        entries = await app.suppressions(limit=10_000)
        return JSONResponse([e.as_json() for e in entries])

    async def add_suppression(request: Request, caller: Caller) -> Response:
        data = await read_json(request, 64 * 1024)
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            raise ApiError(400, "invalid_field", 'send {"address": ..., "reason": ...}')
        added = await app.suppress(data["address"], reason=_optional_str(data, "reason"))
        return JSONResponse(
            {"address": data["address"], "added": added}, status_code=201 if added else 200
        )

    async def remove_suppression(request: Request, caller: Caller) -> Response:
        removed = await app.unsuppress(request.path_params["address"])
        if not removed:
            raise NotFound(f"{request.path_params['address']} is not on the suppression list")
        return JSONResponse({"address": request.path_params["address"], "removed": True})

    async def get_metrics(request: Request, caller: Caller) -> Response:
        if metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        body = await metrics.exposition()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request, caller: Caller) -> Response:
        """The process is up (for a load balancer's liveness check)."""
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request, caller: Caller) -> Response:
        """The store answers and, in serve, the worker runs (for readiness checks)."""
        try:
            await asyncio.wait_for(app.store.next_due_at(), timeout=5)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        if worker is not None and not getattr(worker, "running", True):
            return JSONResponse(
                {"status": "unavailable", "error": "the worker is not running"}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request, caller: Caller) -> Response:
        return JSONResponse(openapi_document())

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed here")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "unexpected error (logged)")

    send, admin, public = Scope.SEND, Scope.ADMIN, None
    routes: list[BaseRoute] = [
        Route("/v1/messages", endpoint(post_message, send), methods=["POST"]),
        Route("/v1/messages", endpoint(list_messages, admin), methods=["GET"]),
        Route("/v1/messages/batch", endpoint(post_batch, send), methods=["POST"]),
        Route("/v1/messages/{queue_id}", endpoint(get_message, send), methods=["GET"]),
        Route("/v1/stats", endpoint(get_stats, admin), methods=["GET"]),
        Route("/v1/queue", endpoint(list_messages, admin), methods=["GET"]),
        Route("/v1/queue/import", endpoint(import_export, admin), methods=["POST"]),
        Route("/v1/queue/{action}", endpoint(post_action, admin), methods=["POST"]),
        Route("/v1/dlq", endpoint(list_dead, admin), methods=["GET"]),
        Route("/v1/dlq/groups", endpoint(dead_groups, admin), methods=["GET"]),
        Route("/v1/dlq/{action}", endpoint(post_action, admin), methods=["POST"]),
        Route("/v1/suppressions", endpoint(list_suppressions, admin), methods=["GET"]),
        Route("/v1/suppressions", endpoint(add_suppression, admin), methods=["POST"]),
        Route(
            "/v1/suppressions/{address}", endpoint(remove_suppression, admin), methods=["DELETE"]
        ),
        Route("/metrics", endpoint(get_metrics, public), methods=["GET"]),
        Route("/healthz", endpoint(healthz, public), methods=["GET"]),
        Route("/readyz", endpoint(readyz, public), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi, public), methods=["GET"]),
    ]
    if probes_only:
        probes = ("/metrics", "/healthz", "/readyz")
        routes = [r for r in routes if getattr(r, "path", None) in probes]
    elif config.http.dashboard:
        from postlane import dashboard

        routes += dashboard.dashboard_routes()
    asgi = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )
    if config.http.dashboard and not probes_only:
        dashboard.install(asgi.state, config, app)
    return asgi


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: postlane's own handlers stop everything in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def bind(listen: str, what: str) -> socket.socket:
    """A listening socket, or a one-line error naming the setting."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what} {listen}: cannot listen ({exc.strerror})") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def start_http(
    config: Config,
    app: AsyncPostlane,
    metrics: Metrics | None = None,
    worker: Any = None,
    *,
    probes_on: str | None = None,
) -> AsyncIterator[str]:
    """Serve the API until the context exits; yields the address it listens on. With
    ``probes_on`` (HOST:PORT), serve only /metrics, /healthz and /readyz there (a worker)."""
    listen = probes_on or config.http.listen
    sock = bind(listen, "worker --metrics" if probes_on else "http.listen")
    host, port = sock.getsockname()[:2]
    server = _Server(
        uvicorn.Config(
            build_app(config, app, metrics, worker, probes_only=probes_on is not None),
            log_level="warning",
            lifespan="off",
            access_log=False,
            server_header=False,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="postlane-http")
    # uvicorn has no "started" event; its startup is quick (the socket is already bound)
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    address = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    if probes_on is not None:
        log.info("metrics and health probes on %s", address)
    elif not config.http.tokens and not config.http.send_tokens:
        log.info("HTTP API on %s (no token configured: loopback clients only)", address)
    else:
        log.info("HTTP API on %s", address)
    try:
        yield address
    finally:
        server.should_exit = True
        await task
        sock.close()
