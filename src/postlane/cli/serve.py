"""``postlane serve`` and ``postlane worker``: the commands that run postlane (the whole service,
or delivery alone); and ``postlane migrate``. They are the only commands that create the store."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import click

from postlane.app import AsyncPostlane
from postlane.cli.context import config_option, invocation, run_async, setup_logging
from postlane.config import Config


@click.command()
@config_option
@click.option(
    "--processes",
    metavar="N|auto",
    help="Run N serve processes on the same ports and store, under a supervisor that restarts "
    'any that dies ("auto": one per core; default: [serve] processes, else 1).',
)
@click.option("--process-slot", hidden=True, help="(a supervised child: INDEX/COUNT)")
@click.option("--listen-fd", "listen_fds", multiple=True, hidden=True, help="(NAME=FD)")
def serve(processes: str | None, process_slot: str | None, listen_fds: tuple[str, ...]) -> None:
    """Worker + HTTP API + metrics + SMTP submission, in one process (or in N, each all of
    these, with --processes N)."""
    from postlane import serve as service

    setup_logging()
    current = invocation()
    config = current.config()
    if process_slot is not None:  # a child of the supervisor (postlane.supervisor)
        from postlane.supervisor import ProcessSlot, inherited_sockets, parse_descriptors

        try:
            slot = ProcessSlot.parse(process_slot)
            descriptors = parse_descriptors(listen_fds)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        sockets = inherited_sockets(descriptors)
        run_async(service.run(config, ingest=True, slot=slot, sockets=sockets))
        return
    count = config.serve.processes
    if processes is not None:
        from postlane.config import parse_processes

        try:
            count = parse_processes(processes)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--processes") from None
    warn_about_readable_files(config)
    if count == 1:
        run_async(service.run(config, ingest=True))
        return
    from postlane.supervisor import child_command, supervise

    status = supervise(config, count, child_command(current.config_path, debug=current.debug))
    if status != 0:
        raise click.exceptions.Exit(status)


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
    warn_about_readable_files(config)
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


@click.command()
@config_option
def migrate() -> None:
    """Create the store, or bring its schema up to this postlane's, then exit (a deployment's
    migration job; serve and worker do it too when they start)."""
    run_async(_migrate(invocation().config()))


async def _migrate(config: Config) -> None:
    from postlane.store import schema_version

    async with AsyncPostlane(config, create=True) as app:
        done = app.store.migration
        if done is None:
            version = schema_version(config.store.url)
            click.echo(f"{app.store.description}: schema version {version}, nothing to migrate")
        elif done.from_version == 0:
            click.echo(f"{app.store.description}: created at schema version {done.to_version}")
        else:
            click.echo(done.describe())


async def _burst(config: Config) -> None:
    """Deliver what is due now (arq's burst mode), then say what happened."""
    from postlane.transports import delivery_transport
    from postlane.worker import Worker

    async with AsyncPostlane(config, create=True) as app:
        # with the store's keys, as serve: mail sent in bursts keeps its return paths and links
        transport = await delivery_transport(config, app.store, app.clock.now())
        worker = Worker.from_config(config, app.store, transport, clock=app.clock)
        await worker.reclaim_dead_owners()
        try:
            attempts = await worker.run_until_idle()
        finally:
            await transport.close()
        click.echo(f"{attempts} attempt(s), {worker.sent} delivered", err=True)


def readable_by_others(config: Config) -> list[tuple[Path, int]]:
    """The files holding what others must not read that group or others can: the SQLite
    database (whole messages; new ones are created 0600, older ones may be 0644) and the DKIM
    private keys. Each with its permission bits."""
    from postlane.store import sqlite_path

    paths: list[Path] = []
    if config.store.url.startswith("sqlite://"):
        paths.append(sqlite_path(config.store.url, config.base_dir))
    paths += [config.resolve_path(key.private_key) for key in config.dkim.values()]
    found = []
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue  # not there yet (the store creates its file 0600), or not ours to see
        if mode & 0o044:
            found.append((path, mode))
    return found


def warn_about_readable_files(config: Config) -> None:
    """One warning line at start naming the files :func:`readable_by_others` finds."""
    found = readable_by_others(config)
    if found:
        files = ", ".join(f"{path} (mode {mode:04o})" for path, mode in found)
        logging.getLogger("postlane").warning(
            "readable by other users: %s; they hold whole messages or private keys: chmod 600 them",
            files,
        )
