"""Request bodies, read within bounds: of the type an endpoint takes, no larger than its
limit, never stalled for long, within the process's budget of bytes in flight, and parsed as
strict JSON. Every refusal is an :class:`ApiError` with the HTTP status and JSON error code
the API answers it with (:mod:`postlane.ingest.http`)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request

from postlane.toml_values import is_decimal

__all__ = [
    "JSON_TYPES",
    "NDJSON",
    "NDJSON_TYPES",
    "ApiError",
    "RequestBudget",
    "Reservation",
    "parse_json",
    "read_body",
    "require_media_type",
]

NDJSON = "application/x-ndjson"
#: what a JSON endpoint takes: never a type a web page may post cross-site without asking
#: (text/plain, a form), so the browser asks first (CORS preflight) and we never say yes
JSON_TYPES = ("application/json",)
#: what the import endpoint takes (JSON Lines)
NDJSON_TYPES = (NDJSON, "application/jsonl", "application/x-jsonlines")
#: seconds a client is told to wait (Retry-After) when the request budget is spent
BUSY_RETRY_AFTER = 2


class ApiError(Exception):
    """A refusal with its HTTP status and JSON error code (and headers, e.g. Retry-After)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class RequestBudget:
    """Bytes of request bodies being read or worked on, process-wide, bounded (audit finding
    10: six 130 MB batches at once took 1.5 GB). A request takes its declared
    ``Content-Length`` before its body is read (a chunked one, as it arrives) and gives it back
    when answered; one that does not fit is answered 503 with Retry-After at once, unread. The
    default fits one largest batch and one largest message besides, so a batch never blocks
    ordinary sends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: requests turned away for want of room (a metric)
        self.refused = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class Reservation:
    """What one request holds of the :class:`RequestBudget`."""

    def __init__(self, budget: RequestBudget) -> None:
        self.budget = budget
        self.held = 0

    def hold(self, size: int) -> None:
        """Hold ``size`` bytes in all, or refuse the request (503)."""
        if size <= self.held:
            return
        if not self.budget.take(size - self.held):
            raise ApiError(
                503,
                "busy",
                "the server is reading as many large requests as it may at once: retry shortly",
                {"Retry-After": str(BUSY_RETRY_AFTER)},
            )
        self.held = size

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


async def read_body(
    request: Request, limit: int, *, reservation: Reservation, timeout: float
) -> bytearray:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, dropped (408)
    should it stall for ``timeout`` seconds, and held by ``reservation`` before it is read
    (503 when the server is already reading as much as it may)."""
    too_large = ApiError(413, "message_too_large", f"the request body is over {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and is_decimal(length):
        if int(length) > limit:
            raise too_large
        reservation.hold(int(length))
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return body
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the request body stalled for {timeout:g} s",
                {"Connection": "close"},  # a stalled client is not kept
            ) from None
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client went away") from None
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
        reservation.hold(len(body))  # a chunked body, counted as it comes


def require_media_type(request: Request, accepted: Sequence[str]) -> None:
    """Refuse (415) a body that does not say it is one of ``accepted``."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in accepted:
        said = f"Content-Type {media!r}" if media else "no Content-Type"
        raise ApiError(
            415, "unsupported_media_type", f"send Content-Type: {accepted[0]} (got {said})"
        )


def parse_json(body: bytearray | str) -> Any:
    """Strict JSON (see :func:`read_json`), or a 400 ``invalid_json`` saying what is wrong.
    A body given as a bytearray is emptied once decoded: a large body is held once as bytes
    or as text, never twice alongside what is parsed from it."""
    try:
        if isinstance(body, bytearray):
            text = body.decode("utf-8")
            del body[:]
        else:
            text = body
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    _check_strings(data)
    return data


def _no_constant(name: str) -> Any:
    raise ApiError(400, "invalid_json", f"the body is not valid JSON: {name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, "invalid_json", f"the number {text[:30]} is too large")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_strings(data: Any) -> None:
    """No string (nor key) holds a lone surrogate (a ``\\ud800`` escape alone): it is not
    Unicode text, and could not be stored, shown or sent. Walked without recursion."""
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found is not None:
                raise ApiError(
                    400,
                    "invalid_json",
                    f"the body holds a lone surrogate {found.group()!r}: not Unicode text",
                )
        elif isinstance(value, dict):
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
