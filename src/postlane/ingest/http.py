"""The HTTP API (Starlette on uvicorn): enqueue, read, stats, metrics, health.

Bearer tokens from ``[http] tokens`` or ``$POSTLANE_API_TOKEN``. With no token configured the API
answers only clients on loopback. ``/metrics`` and ``/healthz`` need no token, so a Prometheus
scraper and a load balancer can reach them. Errors are ``{"error": {"code", "message"}}`` with a
4xx status, and a refused request stores nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from postlane.app import AsyncPostlane
from postlane.config import Config, parse_listen
from postlane.errors import (
    MessageTooLarge,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    ValidationError,
)
from postlane.message import Attachment, Message
from postlane.metrics import Metrics

log = logging.getLogger("postlane.http")

MAX_BATCH = 1000
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


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(request: Request, tokens: tuple[str, ...]) -> None:
    if not tokens:
        if not _is_loopback(request):
            raise ApiError(
                403, "forbidden", "no API token is configured: the API answers only on loopback"
            )
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
    if not any(hmac.compare_digest(token.strip().encode(), t.encode()) for t in tokens):
        raise ApiError(401, "unauthorized", "the token is not valid")


async def read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "message_too_large", f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(413, "message_too_large", f"the request body is over {limit} bytes")
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
    for item in data.get("attachments") or []:
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
    raw = _optional_str(data, "raw")
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
        raw=raw,
        lane=_optional_str(data, "lane") or "normal",
        idempotency_key=key,
        metadata=metadata,
    )


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


Handler = Callable[[Request], Awaitable[Response]]


def build_app(config: Config, app: AsyncPostlane, metrics: Metrics | None = None) -> Starlette:
    """The Starlette application (tests drive it with httpx's ASGI transport)."""
    tokens = config.http.tokens
    max_size = config.smtp.max_size
    body_limit = int(max_size * JSON_OVERHEAD) + 64 * 1024

    def guarded(handler: Handler, *, auth: bool = True) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    check_token(request, tokens)
                return await handler(request)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message)
            except PostlaneError as exc:
                return _postlane_error(exc)

        return endpoint

    async def post_message(request: Request) -> Response:
        data = await read_json(request, body_limit)
        message = message_from_json(data, request.headers.get("idempotency-key"))
        result = await app.send(message)
        if metrics is not None and not result.duplicate:
            metrics.enqueued.labels("http").inc()
        return JSONResponse(result.as_json(), status_code=202)

    async def post_batch(request: Request) -> Response:
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
                prepared.append(app.prepare(message_from_json(item)))
                positions.append(index)
            except ApiError as exc:
                results[index] = {"error": {"code": exc.code, "message": exc.message}}
            except PostlaneError as exc:
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

    async def get_message(request: Request) -> Response:
        view = await app.get(request.path_params["queue_id"], history=True)
        return JSONResponse(view.as_json())

    async def get_stats(request: Request) -> Response:
        return JSONResponse((await app.stats()).as_json())

    async def get_metrics(request: Request) -> Response:
        if metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        body = await metrics.exposition()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request) -> Response:
        try:
            await asyncio.wait_for(app.store.next_due_at(), timeout=5)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed here")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "unexpected error (logged)")

    routes = [
        Route("/v1/messages", guarded(post_message), methods=["POST"]),
        Route("/v1/messages/batch", guarded(post_batch), methods=["POST"]),
        Route("/v1/messages/{queue_id}", guarded(get_message), methods=["GET"]),
        Route("/v1/stats", guarded(get_stats), methods=["GET"]),
        Route("/metrics", guarded(get_metrics, auth=False), methods=["GET"]),
        Route("/healthz", guarded(healthz, auth=False), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: postlane's own handlers stop everything in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def bind(listen: str, what: str) -> socket.socket:
    """A listening socket, or a one-line error naming the setting."""
    from postlane.errors import ConfigError

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
    config: Config, app: AsyncPostlane, metrics: Metrics | None = None
) -> AsyncIterator[str]:
    """Serve the API until the context exits; yields the address it listens on."""
    sock = bind(config.http.listen, "http.listen")
    host, port = sock.getsockname()[:2]
    server = _Server(
        uvicorn.Config(
            build_app(config, app, metrics),
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
    if not config.http.tokens:
        log.info("HTTP API on %s (no token configured: loopback clients only)", address)
    else:
        log.info("HTTP API on %s", address)
    try:
        yield address
    finally:
        server.should_exit = True
        await task
        sock.close()
