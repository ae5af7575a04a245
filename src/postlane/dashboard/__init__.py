"""The dashboard: ``postlane serve`` answers "is mail flowing, what is stuck, why" at ``/``.

Server-rendered pages (Jinja2, autoescaped), one small vendored stylesheet and one small script
that refreshes the page's ``<main>`` every few seconds; charts are inline SVG drawn here. Every
action is a plain HTML form, so the pages work without JavaScript, and every action goes through
the same :class:`~postlane.app.AsyncPostlane` methods as the CLI and the HTTP API: the same
selectors, the same confirmation (counts by lane, domain, state and class before a delete, a
purge or a requeue), the same export before a delete.

Access (:mod:`postlane.auth`): with ``[http] tokens`` set, an admin token logs in (a session
cookie derived from the token: HttpOnly, SameSite=Strict; ``Authorization: Bearer`` works too);
without tokens, only loopback clients get in. Every form carries a CSRF token, so another site
open in the operator's browser cannot post to a dashboard on localhost.

The package knows nothing of the HTTP API: ``postlane serve`` mounts :func:`dashboard_routes`
beside the API's routes, and :func:`install` puts what the pages need on the application's
state.

- :mod:`~postlane.dashboard.pages`: the pages and the forms they post
- :mod:`~postlane.dashboard.rendering`: access, CSRF, templates, security headers
- :mod:`~postlane.dashboard.forms`: posted forms, filters, where to go back to
- :mod:`~postlane.dashboard.groups`: dead-letter groups
- :mod:`~postlane.dashboard.charts`: the overview's SVG charts
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from postlane.dashboard import pages
from postlane.dashboard.rendering import install, page

__all__ = ["dashboard_routes", "install"]


def dashboard_routes() -> list[BaseRoute]:
    """The dashboard's routes (their pages need :func:`install` on the application's state)."""
    static = StaticFiles(packages=[("postlane", "dashboard/static")])
    return [
        Route("/", page(pages.overview), methods=["GET"]),
        Route("/destinations", page(pages.destinations), methods=["GET"]),
        Route("/destinations/lift", page(pages.lift, post=True), methods=["POST"]),
        Route("/queue", page(pages.queue), methods=["GET"]),
        Route("/queue/action", page(pages.act, post=True), methods=["POST"]),
        Route("/queue/{queue_id}", page(pages.message), methods=["GET"]),
        Route("/dlq", page(pages.dlq), methods=["GET"]),
        Route("/suppressions", page(pages.suppressions), methods=["GET"]),
        Route("/suppressions", page(pages.suppress, post=True), methods=["POST"]),
        Route("/feedback", page(pages.unmatched), methods=["GET"]),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login_post, methods=["POST"]),
        Route("/logout", page(pages.logout, post=True), methods=["POST"]),
        Mount("/ui/static", app=static, name="static"),
    ]
