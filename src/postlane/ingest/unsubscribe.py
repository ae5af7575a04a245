"""The one-click unsubscribe endpoint (RFC 8058): where the ``List-Unsubscribe`` links of
:mod:`postlane.feedback.unsubscribe` lead, behind the reverse proxy that serves ``[unsubscribe]
url``.

- ``POST /u/{token}`` unsubscribes the recipient the token names: an event ``unsubscribed`` and
  a suppression (reason ``unsubscribe``, scope the message's sender domain or ``*``, lanes
  ``[unsubscribe] lanes``: the bulk mail that offers the link, never the password resets and
  receipts of the other lanes), in one transaction, then ``200`` with a short page. It needs
  no bearer token and no CSRF token: the token is the proof, and mail providers POST it from
  their own servers (``List-Unsubscribe=One-Click``, RFC 8058 3.1), cross-site by design. A
  repeat changes nothing and answers the same. A forged, mangled or forgotten token gets
  ``404`` (``not_found``, the same whatever the reason); a store that cannot record gets
  ``503`` and nothing is lost but the click.
- ``GET /u/{token}`` never unsubscribes (link scanners and mail security gateways fetch every
  URL of a message): it shows a page whose button POSTs to the same address, without
  JavaScript.

What an attacker gains: without a token, nothing (a MAC of 130 bits; no address is ever
shown). With one (from the message itself), what the recipient's own mail client could do:
unsubscribe that one address from that one sender domain's bulk mail. So the POST is open
cross-site, as RFC 8058 requires; the pages still refuse framing, send no referrer (the
token is in the URL), are never cached, and load nothing.
"""

from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from postlane.errors import StoreUnavailable
from postlane.feedback import Feedback, FeedbackKind
from postlane.feedback.unsubscribe import UnsubscribeLinks
from postlane.message import Lane, in_lane_order
from postlane.toml_values import is_decimal

if TYPE_CHECKING:
    from postlane.app import AsyncPostlane
    from postlane.config import Config
    from postlane.metrics import Metrics

__all__ = ["MAX_BODY", "unsubscribe_routes"]

log = logging.getLogger("postlane.unsubscribe")

#: the largest POST body read: a one-click POST carries 26 bytes (``List-Unsubscribe=One-Click``)
MAX_BODY = 4096
#: where an unsubscribe comes from (the event's and the suppression's source, a metric label)
SOURCE = "unsubscribe"
#: how long a link should keep working: CAN-SPAM asks for at least 30 days after sending
LINK_LIFETIME = 30 * 86400.0

#: on every page: nothing loaded, no framing, no referrer (the token is in the URL), no cache
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}
button{{font:inherit;padding:.5rem 1.25rem;cursor:pointer}}</style></head>
<body><main><h1>{title}</h1>{body}</main></body></html>
"""
_CONFIRM = (
    "<p>Stop receiving these emails at this address?</p>"
    '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
    '<button type="submit">Unsubscribe</button></form>'
)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    content = _PAGE.format(title=html.escape(title), body=body)
    return HTMLResponse(content, status_code=status, headers=_HEADERS)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=_HEADERS
    )


_NOT_FOUND = "no such unsubscribe link"


class _Endpoint:
    """The two routes' shared state: the links (the store's key, read on first use) and where
    an unsubscribe suppresses."""

    def __init__(self, config: Config, app: AsyncPostlane, metrics: Metrics | None) -> None:
        assert config.unsubscribe.url is not None
        self.url = config.unsubscribe.url
        self.global_scope = config.unsubscribe.scope == "global"
        self.lanes = frozenset(Lane(lane) for lane in config.unsubscribe.lanes)
        self.app = app
        self.metrics = metrics
        self._links: UnsubscribeLinks | None = None

    async def links(self) -> UnsubscribeLinks:
        if self._links is None:
            key = await self.app.store.secret("unsubscribe", self.app.clock.now())
            self._links = UnsubscribeLinks(self.url, key)
        return self._links

    async def confirm(self, request: Request) -> Response:
        """``GET /u/{token}``: the page whose button unsubscribes (nothing changes here)."""
        try:
            links = await self.links()
        except StoreUnavailable:
            return _page("Try again later", "<p>This page is not available now.</p>", 503)
        if links.delivery_id(request.path_params["token"]) is None:
            return _page("Link not valid", "<p>This unsubscribe link is not valid.</p>", 404)
        return _page("Unsubscribe", _CONFIRM)

    async def unsubscribe(self, request: Request) -> Response:
        """``POST /u/{token}``: unsubscribe the recipient the token names (see the module)."""
        if not await _body_within(request, MAX_BODY):
            return _error(413, "message_too_large", f"the request body is over {MAX_BODY} bytes")
        try:
            links = await self.links()
            delivery_id = links.delivery_id(request.path_params["token"])
            if delivery_id is None:
                return _error(404, "not_found", _NOT_FOUND)
            refs = await self.app.store.delivery_refs([delivery_id])
            if not refs:  # purged with its message after [store] retention
                return _error(404, "not_found", _NOT_FOUND)
            [ref] = refs
            scope = "*" if self.global_scope else ref.sender.rpartition("@")[2].lower() or "*"
            # the kind of mail that offered the link, and only it: the lanes that carry links
            # (and the message's own, should [unsubscribe] lanes have changed since it left)
            lanes = in_lane_order(self.lanes | {ref.lane})
            now = self.app.clock.now()
            item = Feedback(
                FeedbackKind.UNSUBSCRIBED,
                delivery_id,
                now,
                SOURCE,
                text="one-click unsubscribe (List-Unsubscribe)",
                suppression=(scope, "unsubscribe", None),
                suppression_lanes=lanes,
            )
            [result] = await self.app.store.record_feedback([item], now)
        except StoreUnavailable as exc:
            log.warning("an unsubscribe could not be recorded: %s", exc)
            return _error(503, exc.code, "the unsubscribe could not be recorded; try again later")
        if result.changed:
            log.info(
                "delivery %d unsubscribed (scope %s, lanes %s)",
                delivery_id,
                scope,
                ", ".join(lanes),
            )
            if self.metrics is not None:
                self.metrics.feedback.recorded_feedback([item])
        return _page("Unsubscribed", "<p>You will not receive these emails any more.</p>")


async def _body_within(request: Request, limit: int) -> bool:
    """Read the body (``List-Unsubscribe=One-Click``, or anything, or nothing: its content
    changes nothing) unless it passes ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if is_decimal(length) and int(length) > limit:
        return False
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return False
    return True


def unsubscribe_routes(
    config: Config, app: AsyncPostlane, metrics: Metrics | None = None
) -> list[Route]:
    """``GET`` and ``POST /u/{token}`` for ``[unsubscribe] url``'s links; public (no token).
    Mount them beside the API: ``asgi.router.routes += unsubscribe_routes(...)``."""
    if config.unsubscribe.url is None:
        raise ValueError("unsubscribe_routes needs [unsubscribe] url")
    if config.store.retention < LINK_LIFETIME:
        log.warning(
            "[store] retention is under 30 days: an unsubscribe link stops working when its "
            "message is removed (CAN-SPAM asks for 30 days; see docs/unsubscribe.md)"
        )
    endpoint = _Endpoint(config, app, metrics)
    return [
        Route("/u/{token}", endpoint.unsubscribe, methods=["POST"]),
        Route("/u/{token}", endpoint.confirm, methods=["GET"]),
    ]
