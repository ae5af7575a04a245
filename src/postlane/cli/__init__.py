"""The ``postlane`` command line: argument parsing and output, nothing else.

Every command calls the same :class:`postlane.app.AsyncPostlane` the HTTP API calls. Listings take
``--json`` (one JSON document on stdout). Errors are one line on stderr and a non-zero exit; a
traceback only with ``--debug`` (or ``POSTLANE_DEBUG=1``).

This module holds the root group and :func:`main` (the console script, which turns errors into
one line); the commands live by group: ``queue``, ``dlq``, ``suppress``, ``send``, ``serve``
(serve, worker), ``stats`` (stats, alerts), ``classify``, ``credentials`` (hash-password, dkim)
and ``simulate``. What they share: ``context`` (the configuration and the app), ``selectors``,
``actions`` (operator actions with their confirmation) and ``output``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from postlane.cli.classify import classify_command
from postlane.cli.context import Invocation
from postlane.cli.credentials import dkim, hash_password_command
from postlane.cli.dlq import dlq
from postlane.cli.events import events_command
from postlane.cli.feedback import feedback
from postlane.cli.output import unwrap_when_piped
from postlane.cli.queue import queue
from postlane.cli.send import send
from postlane.cli.serve import migrate, serve, worker
from postlane.cli.simulate import simulate_command
from postlane.cli.stats import alerts_command, stats
from postlane.cli.suppress import suppress
from postlane.cli.webhooks import webhooks
from postlane.errors import PostlaneError, ValidationError

__all__ = ["cli", "main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    metavar="PATH",
    envvar="POSTLANE_CONFIG",
    help="Configuration file (default: $POSTLANE_CONFIG, else ./postlane.toml, else defaults).",
)
@click.option("--debug", is_flag=True, envvar="POSTLANE_DEBUG", help="Tracebacks and debug logs.")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Say which configuration and store a command uses (on stderr).",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _print_version(ctx) if value else None,
    help="Show the version and the store schema versions it brings a store to, and exit.",
)
@click.pass_context
def cli(ctx: click.Context, config: str | None, debug: bool, verbose: bool) -> None:
    """postlane: a durable outbound email queue.

    What a command produces (listings, ids, JSON) goes to stdout; what it says about what it
    does (what an action touches, its question and outcome, errors) goes to stderr."""
    current = ctx.ensure_object(Invocation)
    if config is not None and current.config_path is None:
        current.config_path = config
    current.debug = debug
    current.verbose = current.verbose or verbose


def _print_version(ctx: click.Context) -> None:
    """``postlane 0.1.0 (store schema: SQLite 20, PostgreSQL 19)``: the schema versions say
    which stores this postlane can open without migrating them (docs/upgrading.md)."""
    from importlib.metadata import version

    from postlane.store.sql import load_migrations

    sqlite, postgres = (load_migrations(name)[-1][0] for name in ("sqlite", "postgres"))
    click.echo(
        f"postlane {version('postlane')} (store schema: SQLite {sqlite}, PostgreSQL {postgres})"
    )
    ctx.exit()


for command in (
    serve,
    worker,
    migrate,
    send,
    queue,
    stats,
    classify_command,
    dlq,
    suppress,
    events_command,
    feedback,
    webhooks,
    alerts_command,
    hash_password_command,
    dkim,
    simulate_command,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: one line per error, never a traceback unless --debug."""
    debug = os.environ.get("POSTLANE_DEBUG", "") not in ("", "0") or "--debug" in (
        argv if argv is not None else sys.argv[1:]
    )
    unwrap_when_piped()
    arguments = list(argv if argv is not None else sys.argv[1:])
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode (surrogate escapes)
            raw = argument.encode("utf-8", "surrogateescape")
            click.echo(f"postlane: error: an argument is not valid UTF-8: {raw!r}", err=True)
            sys.exit(EXIT_USAGE)
    try:
        code = cli.main(args=arguments, prog_name="postlane", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "postlane"
        click.echo(f"postlane: error: {exc.format_message()} (see '{command} --help')", err=True)
        code = EXIT_USAGE
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        code = 130
    except ValidationError as exc:
        click.echo(f"postlane: refused: {exc.message}", err=True)
        code = EXIT_ERROR
    except PostlaneError as exc:
        click.echo(f"postlane: error: {exc.message}", err=True)
        code = EXIT_ERROR
    except Exception as exc:
        if debug:
            raise
        click.echo(
            f"postlane: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            err=True,
        )
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)
