"""Listening: a bound socket with a one-line error naming its setting, and uvicorn serving an
ASGI application on it for as long as a context lasts (the API alone, or ``serve``'s API and
dashboard side by side)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from postlane.config import Config, parse_listen
from postlane.errors import ConfigError, StoreUnavailable

log = logging.getLogger("postlane.http")


def escaped_store_error(exc: BaseException) -> StoreUnavailable | None:
    """A database driver's own error that escaped the store (which should have raised
    :class:`StoreUnavailable`), as the store's failure: a client is told to retry (503), never
    that it broke something (500). The caller logs it: it is a bug in the store."""
    psycopg = sys.modules.get("psycopg")  # loaded only with a PostgreSQL store
    if isinstance(exc, sqlite3.Error) or (psycopg is not None and isinstance(exc, psycopg.Error)):
        return StoreUnavailable(f"the store failed: {exc}")
    return None


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
async def serve_http(
    asgi: ASGIApp, config: Config, *, probes_on: str | None = None
) -> AsyncIterator[str]:
    """Serve ``asgi`` on ``[http] listen`` (or on ``probes_on``, a worker's probes) until the
    context exits; yields the address it listens on."""
    listen = probes_on or config.http.listen
    sock = bind(listen, "worker --metrics" if probes_on else "http.listen")
    host, port = sock.getsockname()[:2]
    server = _Server(
        uvicorn.Config(
            asgi, log_level="warning", lifespan="off", access_log=False, server_header=False
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
