"""Running postlane: ``serve`` (worker + HTTP API + metrics + SMTP submission, one process) and
``worker`` (delivery only, for scaling out against one PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from postlane.app import AsyncPostlane
from postlane.clock import Clock
from postlane.config import Config
from postlane.transports import transport_for
from postlane.transports.base import Transport
from postlane.worker import Worker

log = logging.getLogger("postlane")


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


async def _monitor(config: Config, app: AsyncPostlane, stop: asyncio.Event) -> None:
    """Record the history and evaluate the alert rules every ``[alerts] interval``."""
    from postlane.alerts import AlertMonitor

    monitor = AlertMonitor.from_config(app, config)
    while not stop.is_set():
        try:
            await monitor.run_once(app.clock.now())
        except Exception:
            log.exception("alert evaluation failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.alerts.interval)


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
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then stop gracefully. A worker
    (``ingest=False``) serves /metrics, /healthz and /readyz on ``metrics_listen`` if given."""
    stop = stop or asyncio.Event()
    remove_handlers = _install_signal_handlers(stop)
    transport = transport_for(config)
    async with AsyncPostlane(config, clock=clock) as app:
        announce(config, app, transport)
        from postlane.metrics import Metrics

        metrics = Metrics(app)
        await metrics.seed_destinations()
        worker = Worker.from_config(
            config, app.store, transport, wake=app.wake, clock=app.clock, observer=metrics
        )
        app.worker = worker
        await worker.reclaim_dead_owners()
        async with contextlib.AsyncExitStack() as servers:
            if ingest:
                from postlane.ingest.http import start_http
                from postlane.ingest.smtp import start_smtp

                await servers.enter_async_context(start_http(config, app, metrics, worker))
                await servers.enter_async_context(start_smtp(config, app, metrics))
            elif metrics_listen is not None:
                from postlane.ingest.http import start_http

                await servers.enter_async_context(
                    start_http(config, app, metrics, worker, probes_on=metrics_listen)
                )
            if on_ready is not None:
                await on_ready(app)
            log.info("postlane is running (lease owner %s)", worker.owner)
            monitor = asyncio.create_task(_monitor(config, app, stop), name="postlane-alerts")
            try:
                await worker.run(stop)
            finally:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
                await transport.close()
        log.info("postlane stopped")
    remove_handlers()
