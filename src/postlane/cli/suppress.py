"""``postlane suppress``: the suppression list, addresses never attempted again."""

from __future__ import annotations

import click

from postlane.cli.context import config_option, json_option, with_app
from postlane.cli.output import first_line, json_or_empty, listing, show
from postlane.clock import when
from postlane.errors import PostlaneError
from postlane.message import parse_address


@click.group()
def suppress() -> None:
    """The suppression list: addresses never attempted again (hard bounces land here)."""


@suppress.command("list")
@config_option
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@json_option
def suppress_list(limit: int, as_json: bool) -> None:
    """The suppressed addresses, newest first, with why each was added."""
    entries = with_app(lambda app: app.suppressions(limit=limit))
    if json_or_empty(entries, as_json=as_json, empty="The suppression list is empty"):
        return
    table = listing("Address", "Since", "Source", "Reason")
    for e in entries:
        reason = first_line(e.text or e.reason or "")
        table.add_row(e.address, when(e.created_at), e.source, reason)
    show(table)


@suppress.command("add")
@config_option
@click.argument("address")
@click.option("--reason", help="Why (kept with the entry).")
def suppress_add(address: str, reason: str | None) -> None:
    """Suppress ADDRESS: mail to it is never attempted (queued mail to it included)."""
    parse_address(address, "address")  # refused before the store is opened
    added = with_app(lambda app: app.suppress(address, reason=reason))
    click.echo(f"{address}: {'added' if added else 'already suppressed'}", err=True)


@suppress.command("remove")
@config_option
@click.argument("address")
def suppress_remove(address: str) -> None:
    """Remove ADDRESS from the suppression list: mail to it is attempted again (dead letters
    to it are not requeued: `postlane dlq requeue`)."""
    removed = with_app(lambda app: app.unsuppress(address))
    if not removed:
        raise PostlaneError(f"{address} is not on the suppression list")
    click.echo(f"{address}: removed", err=True)
