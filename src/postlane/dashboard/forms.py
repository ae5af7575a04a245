"""What the dashboard's forms send: the posted fields, the filters of the queue and dead-letter
pages (read by :func:`postlane.selectors.parse_selector`, as the API and the CLI read theirs),
and where to go back to afterwards (our own pages only)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import cast
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import RedirectResponse

from postlane.clock import Clock
from postlane.errors import PostlaneError, ValidationError
from postlane.records import Selector
from postlane.selectors import parse_selector

__all__ = ["FILTERS", "back_to", "filters_of", "read_form", "safe_back", "selector_from_filters"]

FORM_LIMIT = 1024 * 1024
#: seconds a posted form may take to arrive (a stalled one is dropped, not waited on)
FORM_TIMEOUT = 30.0

#: the filter fields of the queue and dead-letter pages, with the label each shows
FILTERS = {
    "lane": "lane",
    "state": "state",
    "domain": "domain",
    "class": "last reply",
    "older_than": "older than",
    "sender": "sender",
    "recipient": "recipient",
}


async def read_form(request: Request) -> ImmutableMultiDict[str, str]:
    """The posted form (``application/x-www-form-urlencoded``, what every form here sends;
    the standard library parses it, so no multipart parser is needed), read once."""
    cached = request.scope.get("postlane.form")
    if cached is not None:
        return cast(ImmutableMultiDict[str, str], cached)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise PostlaneError("send the page's form (application/x-www-form-urlencoded)")
    body = bytearray()
    try:
        async with asyncio.timeout(FORM_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > FORM_LIMIT:
                    raise PostlaneError("the form is too large")
    except TimeoutError:
        raise PostlaneError("the form did not arrive in time") from None
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    form = ImmutableMultiDict(pairs)
    request.scope["postlane.form"] = form
    return form


def filters_of(params: Mapping[str, str]) -> dict[str, str]:
    """The filters given (blank ones are no filter)."""
    return {k: params[k].strip() for k in FILTERS if params.get(k, "").strip()}


def selector_from_filters(
    clock: Clock, filters: Mapping[str, str], ids: Sequence[str] = ()
) -> Selector:
    """The messages ``ids`` (all of their recipients), else everything the filters match. A bad
    filter is a :class:`ValidationError` that also shows what was asked for."""
    try:
        return parse_selector({**filters, "ids": list(ids), "all": not ids}, clock)
    except ValidationError as exc:
        field = exc.field or ""
        asked = f" (you asked for {FILTERS.get(field, field)} {filters.get(field)!r})"
        raise ValidationError(exc.message + asked, field=exc.field) from None


def safe_back(target: str) -> str:
    """Only our own pages: a path, never another site (``//evil.example`` or a URL)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def back_to(target: str, note: str) -> RedirectResponse:
    """Back to one of our pages, which shows ``note`` (what was just done)."""
    target = safe_back(target)
    joiner = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{joiner}{urlencode({'done': note})}", status_code=303)
