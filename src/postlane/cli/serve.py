"""``postlane serve`` and ``postlane worker``: the commands that run postlane (the whole service,
or delivery alone)."""

from __future__ import annotations

import click

from postlane.app import AsyncPostlane
from postlane.cli.context import config_option, invocation, run_async, setup_logging
from postlane.config import Config


@click.command()
@config_option
def serve() -> None:
    """Worker + HTTP API + metrics + SMTP submission, in one process."""
    from postlane import serve as service

    setup_logging()
    run_async(service.run(invocation().config(), ingest=True))


@click.command()
@config_option
@click.option("--burst", is_flag=True, help="Deliver what is due now, then exit.")
@click.option(
    "--metrics",
    "metrics_listen",
    metavar="HOST:PORT",
    envvar="POSTLANE_WORKER_METRICS",
    help="Serve /metrics, /healthz and /readyz there (e.g. 127.0.0.1:9025).",
)
def worker(burst: bool, metrics_listen: str | None) -> None:
    """Delivery only (run several against one PostgreSQL to scale out)."""
    from postlane import serve as service

    setup_logging()
    config = invocation().config()
    if burst:
        run_async(_burst(config))
    else:
        if metrics_listen is not None:
            from postlane.config import parse_listen

            try:
                parse_listen(metrics_listen)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--metrics") from None
        run_async(service.run(config, ingest=False, metrics_listen=metrics_listen))


async def _burst(config: Config) -> None:
    """Deliver what is due now (arq's burst mode), then say what happened."""
    from postlane.transports import transport_for
    from postlane.worker import Worker

    transport = transport_for(config)
    async with AsyncPostlane(config) as app:
        worker = Worker.from_config(config, app.store, transport, clock=app.clock)
        await worker.reclaim_dead_owners()
        try:
            attempts = await worker.run_until_idle()
        finally:
            await transport.close()
        click.echo(f"{attempts} attempt(s), {worker.sent} delivered", err=True)
