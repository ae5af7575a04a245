"""The HTTP API's endpoints for what happens after the first hop and what the application
hears: the suppression list, the event log, reports nothing matched, and the operator's view
of outbound webhooks (routes in :mod:`postlane.ingest.http`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from postlane.addresses import check_text
from postlane.auth import Caller
from postlane.cursors import Page
from postlane.errors import NotFound
from postlane.events import event_cursor
from postlane.ingest.api_core import (
    MAX_LIST,
    MAX_SUPPRESSION_PAGE,
    ApiJSON,
    context_of,
    invalid_field,
    page_response,
    query_cursor,
    query_limit,
    read_json,
    read_page,
    time_field,
)
from postlane.ingest.bodies import ApiError
from postlane.selectors import optional_string, string_list
from postlane.toml_values import is_decimal

if TYPE_CHECKING:
    pass


# -- suppressions ----------------------------------------------------------------------------------


async def list_suppressions(request: Request, caller: Caller) -> Response:
    """``GET /v1/suppressions?limit=N&cursor=C``: a page of the list, newest first (up to
    10,000 entries unless told fewer), the next page's cursor in the headers;
    ``?address=A`` (repeatable): those addresses' entries, one page."""
    addresses = request.query_params.getlist("address")
    if addresses:  # one page, whatever its length: an address has an entry a reason at most
        found = await context_of(request).postlane.suppressions_of(addresses)
        return page_response(request, Page(found, None))
    limit = query_limit(request, default=MAX_SUPPRESSION_PAGE, most=MAX_SUPPRESSION_PAGE)
    cursor = query_cursor(request)
    postlane = context_of(request).postlane
    page = await read_page(postlane.suppression_page(cursor=cursor, limit=limit))
    return page_response(request, page)


#: the fields ``POST /v1/suppressions`` takes
_SUPPRESSION_FIELDS = ("address", "reason", "scope", "expires_at", "detail", "lanes")


async def add_suppression(request: Request, caller: Caller) -> Response:
    """``POST /v1/suppressions``: add an entry (``lanes``: the lanes whose mail it stops; left
    out or null, every lane). 201 when added, 200 when it was there already; an unknown lane
    is a 422 and nothing is stored."""
    data = await read_json(request, 64 * 1024)
    if not isinstance(data, dict) or not isinstance(data.get("address"), str):
        raise ApiError(
            400,
            "invalid_field",
            'send {"address": ..., "reason": ..., "scope": ..., "expires_at": ..., "detail": ..., '
            '"lanes": [...]}',
        )
    unknown = sorted(set(data) - set(_SUPPRESSION_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}")
    with invalid_field():
        reason = optional_string(data.get("reason"), "reason")
        scope = optional_string(data.get("scope"), "scope")
        detail = optional_string(data.get("detail"), "detail")
        lanes = None if data.get("lanes") is None else string_list(data["lanes"], "lanes")
    for value, what in ((reason, "reason"), (scope, "scope"), (detail, "detail")):
        if value is not None:
            check_text(value, what)  # a ValidationError: 422, as a message's fields
    added = await context_of(request).postlane.suppress(
        data["address"],
        reason=reason,
        scope=scope,
        expires_at=time_field(data.get("expires_at"), "expires_at"),
        detail=detail,
        source="api",
        lanes=lanes,
    )
    return ApiJSON({"address": data["address"], "added": added}, status_code=201 if added else 200)


async def remove_suppression(request: Request, caller: Caller) -> Response:
    address = request.path_params["address"]
    unknown = sorted(set(request.query_params) - {"scope", "reason"})
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown parameter {unknown[0]!r}")
    scope = request.query_params.get("scope")
    reason = request.query_params.get("reason")
    if not await context_of(request).postlane.unsuppress(address, scope=scope, reason=reason):
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
    if not is_decimal(limit_text) or not 1 <= int(limit_text) <= MAX_LIST:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_LIST}")
    with invalid_field():
        page = await context_of(request).postlane.events(
            query.get("after"), limit=int(limit_text), types=query.getlist("type")
        )
    return ApiJSON(page.as_json())


# -- reports nothing matched ----------------------------------------------------------------------


async def list_unmatched(request: Request, caller: Caller) -> Response:
    limit_text = request.query_params.get("limit", "100")
    if not is_decimal(limit_text) or not 1 <= int(limit_text) <= MAX_LIST:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_LIST}")
    reports = await context_of(request).postlane.store.list_unmatched(limit=int(limit_text))
    return ApiJSON([report.as_json() for report in reports])


async def get_unmatched(request: Request, caller: Caller) -> Response:
    text = request.path_params["report_id"]
    if not is_decimal(text) or len(text) > 19:
        raise NotFound(f"no unmatched report {text!r}")
    report = await context_of(request).postlane.store.get_unmatched(int(text))
    content = (report.content or b"").decode("utf-8", "replace")
    return ApiJSON({**report.as_json(), "content": content})


# -- outbound webhooks (the operator's view) ------------------------------------------------------


def _webhook_endpoints(request: Request) -> Any:
    endpoints = context_of(request).postlane.config.webhooks_out
    if not endpoints:
        raise NotFound("no webhook endpoint is configured ([[webhooks.out]])")
    return endpoints


async def list_webhooks(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import endpoint_statuses

    postlane = context_of(request).postlane
    statuses = await endpoint_statuses(
        postlane.store, postlane.config.webhooks_out, now=postlane.clock.now(),
        sender=postlane.webhooks,
    )  # fmt: skip
    return ApiJSON(statuses)  # none configured: [], as every listing


async def webhook_failures(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import failures

    postlane = context_of(request).postlane
    found = await failures(
        postlane.store, _webhook_endpoints(request), sender=postlane.webhooks,
        name=request.path_params["name"],
    )  # fmt: skip
    return ApiJSON(found)


async def webhook_test(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.endpoints import endpoint_named
    from postlane.webhooks.operations import send_test_event

    endpoint = endpoint_named(_webhook_endpoints(request), request.path_params["name"])
    result = await send_test_event(endpoint, now=context_of(request).postlane.clock.now())
    return ApiJSON(result.as_json())


async def webhook_replay(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import replay

    data = await read_json(request, 4096) if await _has_body(request) else {}
    if not isinstance(data, dict) or set(data) - {"after"}:
        raise ApiError(400, "invalid_field", 'send {"after": EVENT_ID} or nothing')
    after = data.get("after")
    if after is not None:
        with invalid_field():
            after = event_cursor(after)
    postlane = context_of(request).postlane
    name = request.path_params["name"]
    await replay(
        postlane.store, _webhook_endpoints(request), name, after=after, now=postlane.clock.now()
    )
    return ApiJSON({"endpoint": name, "replaying_after": None if after is None else str(after)})


async def webhook_resume(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import resume

    postlane = context_of(request).postlane
    name = request.path_params["name"]
    await resume(postlane.store, _webhook_endpoints(request), name, now=postlane.clock.now())
    return ApiJSON({"endpoint": name, "resumed": True})


async def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return length not in (None, "0") or "transfer-encoding" in request.headers
