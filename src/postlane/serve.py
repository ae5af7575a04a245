"""Running postlane: ``serve`` (worker + HTTP API + dashboard + metrics + SMTP submission, one
process) and ``worker`` (delivery only, for scaling out against one PostgreSQL).

``serve`` is where the HTTP API (:mod:`postlane.ingest.http`) and the dashboard
(:mod:`postlane.dashboard`) meet: :func:`build_app` mounts them side by side on one Starlette
application; neither knows the other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from postlane.app import AsyncPostlane
from postlane.clock import Clock
from postlane.config import Config, format_duration
from postlane.errors import StoreUnavailable
from postlane.ingest.door import FrontDoor
from postlane.logs import OutageLog
from postlane.transports import delivery_transport
from postlane.transports.base import Transport
from postlane.worker import Worker

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from postlane.metrics import Metrics
    from postlane.supervisor import ProcessSlot

log = logging.getLogger("postlane")


def build_app(
    door: FrontDoor, *, probes_only: bool = False, process: ProcessSlot | None = None
) -> Starlette:
    """serve's HTTP face: the API and, beside it, the dashboard (unless ``[http] dashboard =
    false``); with ``probes_only`` (a worker's ``--metrics``), /metrics, /healthz and /readyz.
    What no route answers gets the API's JSON errors."""
    # imported here: a worker without --metrics never loads the dashboard
    from postlane import dashboard
    from postlane.ingest import http as api

    asgi = api.build_app(door, probes_only=probes_only, process=process)
    if door.config.unsubscribe.url is not None and not probes_only:
        from postlane.ingest.unsubscribe import unsubscribe_routes

        asgi.router.routes += unsubscribe_routes(door.config, door.app, door.metrics)
    if door.config.http.dashboard and not probes_only:
        asgi.router.routes += dashboard.dashboard_routes()
        # the API's tokens: one count of failed attempts, whichever door a guesser knocks at
        dashboard.install(asgi.state, door.config, door.app, tokens=asgi.state.api.tokens)
    return asgi


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


async def _monitor(
    config: Config, app: AsyncPostlane, stop: asyncio.Event, metrics: Metrics | None = None
) -> None:
    """Record the history and evaluate the alert rules every ``[alerts] interval``; with
    ``metrics`` (process 0 of ``serve --processes N``, which any scrape may miss), count the
    dead letters recovered meanwhile too."""
    from postlane.alerts import AlertMonitor

    monitor = AlertMonitor.from_config(app, config)
    log.info("alerts: evaluating the rules every %s", format_duration(config.alerts.interval))
    outage = OutageLog(log, "alerts not evaluated")
    while not stop.is_set():
        try:
            await monitor.run_once(app.clock.now())
            outage.answered()
        except StoreUnavailable as exc:  # one line, not a traceback: /readyz says it too
            outage.failed(exc)
        except Exception:
            log.exception("alert evaluation failed")
        if metrics is not None:
            await metrics.observe_recoveries()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.alerts.interval)


async def _supervised(metrics: Metrics, stop: asyncio.Event) -> None:
    """Under ``serve --processes N``, every second: share this process's tallies with the
    others' /metrics, and stop when the supervisor is gone (killed with SIGKILL, it could not
    stop its children), so that no orphan keeps the ports."""
    supervisor = os.getppid()
    while not stop.is_set():
        if os.getppid() != supervisor:
            log.warning("the supervisor (pid %d) is gone: stopping", supervisor)
            stop.set()
            return
        metrics.share_tallies()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


def _bounce_listener(
    config: Config,
    app: AsyncPostlane,
    metrics: Metrics,
    verp_key: bytes,
    sock: socket.socket | None = None,
    mail_activity: Callable[[], int] | None = None,
) -> contextlib.AbstractAsyncContextManager[str]:
    """The listener for what comes back to ``[bounces] domain`` (docs/bounces.md); while
    ``mail_activity`` moves (the worker delivers), reports yield to mail."""
    from postlane.feedback.inbound import BounceProcessor
    from postlane.ingest.bounces import BounceListenerSettings, start_bounce_listener

    bounces = config.bounces
    processor = BounceProcessor.from_config(bounces, app.store, verp_key, clock=app.clock)
    settings = BounceListenerSettings(
        listen=bounces.listen,
        max_size=bounces.max_size,
        max_connections=bounces.max_connections,
        max_connections_per_address=bounces.max_connections_per_address,
        timeout=bounces.timeout,
        hostname=config.smtp.hostname,
        report_addresses=bounces.report_addresses,
    )
    return start_bounce_listener(
        processor, settings, observer=metrics, sock=sock, mail_activity=mail_activity
    )


def _start_webhooks(
    config: Config, app: AsyncPostlane, worker: Worker, metrics: Metrics, stop: asyncio.Event
) -> asyncio.Task[None] | None:
    """The sender of ``[[webhooks.out]]`` beside the worker (mail goes first: while the worker
    delivers, webhook requests yield); None without endpoints."""
    if not config.webhooks_out:
        return None
    from postlane.webhooks.sender import WebhookSender

    sender = WebhookSender(
        app.store,
        config.webhooks_out,
        clock=app.clock,
        owner=worker.owner,
        observer=metrics,
        mail_activity=lambda: worker.attempts,
    )
    app.webhooks = sender
    names = ", ".join(endpoint.name for endpoint in config.webhooks_out)
    log.info("webhooks: sending events to %s", names)
    return asyncio.create_task(sender.run(stop), name="postlane-webhooks")


def announce(config: Config, app: AsyncPostlane, transport: Transport) -> None:
    log.info("configuration: %s", config.source)
    log.info("store: %s", app.store.description)
    if config.delivery.relay.startswith("capture:"):
        log.warning(
            "delivery goes to the capture folder %s: nothing leaves this machine until "
            "[delivery] relay is configured",
            transport.name.removeprefix("capture://"),
        )
    else:
        log.info("delivery: %s", transport.name)  # a transport's name never holds a secret


async def run(
    config: Config,
    *,
    ingest: bool = True,
    stop: asyncio.Event | None = None,
    clock: Clock | None = None,
    on_ready: Callable[[AsyncPostlane], Awaitable[None]] | None = None,
    metrics_listen: str | None = None,
    slot: ProcessSlot | None = None,
    sockets: Mapping[str, socket.socket] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then stop gracefully. A worker
    (``ingest=False``) serves /metrics, /healthz and /readyz on ``metrics_listen`` if given.
    Under ``serve --processes N`` (:mod:`postlane.supervisor`), ``slot`` says which process
    this is and ``sockets`` are the listening sockets it shares with the others (``http``,
    ``smtp``, ``bounces``); only process 0 evaluates the alerts."""
    sockets = sockets or {}
    if ingest:
        from postlane.auth import Tokens

        Tokens.from_config(config.http)  # a short token is refused before anything is opened
    stop = stop or asyncio.Event()
    remove_handlers = _install_signal_handlers(stop)
    async with AsyncPostlane(config, clock=clock) as app:
        transport = await delivery_transport(config, app.store, app.clock.now())
        announce(config, app, transport)
        from postlane.metrics import Metrics

        metrics = Metrics(
            app,
            across_processes=slot is not None,
            observes_recoveries=slot is None or slot.index == 0,
        )
        await metrics.seed_destinations()
        worker = Worker.from_config(
            config, app.store, transport, wake=app.wake, clock=app.clock, observer=metrics
        )
        app.worker = worker
        await worker.reclaim_dead_owners()
        door = FrontDoor(config, app, metrics, worker)  # what the HTTP and SMTP doors share
        async with contextlib.AsyncExitStack() as servers:
            if ingest or metrics_listen is not None:
                from postlane.ingest.server import serve_http

                probes_on = None if ingest else metrics_listen
                asgi = build_app(door, probes_only=probes_on is not None, process=slot)
                await servers.enter_async_context(
                    serve_http(
                        asgi,
                        config,
                        probes_on=probes_on,
                        refusals=asgi.state.api.refusals,
                        sock=sockets.get("http"),
                    )
                )
            if ingest:
                from postlane.ingest.smtp import start_smtp

                await servers.enter_async_context(
                    start_smtp(
                        door,
                        sock=sockets.get("smtp"),
                        ident="postlane" if slot is None else f"postlane process {slot.index}",
                    )
                )
                if config.bounces.domain is not None:
                    await servers.enter_async_context(
                        _bounce_listener(
                            config,
                            app,
                            metrics,
                            await app.store.secret("verp", app.clock.now()),
                            sockets.get("bounces"),
                            mail_activity=lambda: worker.attempts,
                        )
                    )
            if on_ready is not None:
                await on_ready(app)
            if slot is None:
                log.info("postlane is running (lease owner %s)", worker.owner)
            else:
                log.info(
                    "postlane is running (process %d of %d, pid %d, lease owner %s)",
                    slot.index,
                    slot.count,
                    os.getpid(),
                    worker.owner,
                )
            background = []
            if slot is None or slot.index == 0:  # one alert evaluator for all the processes
                background.append(
                    asyncio.create_task(
                        _monitor(config, app, stop, metrics if slot is not None else None),
                        name="postlane-alerts",
                    )
                )
            if slot is not None:
                background.append(
                    asyncio.create_task(_supervised(metrics, stop), name="postlane-supervised")
                )
            webhooks = _start_webhooks(config, app, worker, metrics, stop)
            try:
                await worker.run(stop)
            finally:
                for task in background:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if webhooks is not None:
                    stop.set()  # (the worker may have ended on its own)
                    await webhooks  # in-flight requests finish briefly, cursors are saved
                await transport.close()
        log.info("postlane stopped")
    remove_handlers()
