"""``postlane suppress``: the suppression list, addresses never attempted again."""

from __future__ import annotations

import time
from collections.abc import Sequence

import click

from postlane.addresses import parse_address
from postlane.cli.context import config_option, json_option, limit_option, read_first, with_app
from postlane.cli.output import first_line, json_or_empty, listing, show
from postlane.clock import when
from postlane.errors import PostlaneError, ValidationError
from postlane.records import SUPPRESSION_REASONS, Suppression
from postlane.toml_values import parse_duration


@click.group()
def suppress() -> None:
    """The suppression list: addresses never attempted again (hard bounces land here)."""


@suppress.command("list")
@click.argument("addresses", nargs=-1, metavar="[ADDRESS]...")
@config_option
@limit_option(1000, most=100_000)
@json_option
def suppress_list(addresses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """The suppressed addresses, newest first: why (reason), for whose mail (scope: * for
    every sender, or a sender domain; lanes: every lane, or those named), since and until
    when. With ADDRESS: that address's entries only, however long the list."""
    entries: Sequence[Suppression]
    if addresses:
        entries = with_app(lambda app: app.suppressions_of(addresses))
        empty = f"No entry for {', '.join(addresses)} on the suppression list"
    else:
        entries = read_first(lambda app, n: app.suppressions(limit=n), limit, "entries")
        empty = "The suppression list is empty"
    if json_or_empty(entries, as_json=as_json, empty=empty):
        return
    table = listing(
        "Address", "Reason", "Scope", "Lanes", "Since (UTC)", "Until (UTC)", "Source", "Detail"
    )
    for e in entries:
        until = when(e.expires_at) if e.expires_at is not None else "never"
        detail = first_line(e.detail or e.text or "")
        lanes = "every" if e.lanes is None else ", ".join(e.lanes)
        table.add_row(
            e.address, e.reason or "", e.scope, lanes, when(e.created_at), until, e.source, detail
        )
    show(table)


@suppress.command("add")
@config_option
@click.argument("address")
@click.option(
    "--reason",
    default="manual",
    show_default=True,
    help="hard_bounce, complaint, unsubscribe or manual (other text is kept as the detail "
    "of a manual entry).",
)
@click.option(
    "--scope",
    default="*",
    show_default=True,
    metavar="DOMAIN",
    help="Only mail from this sender domain (* : every sender).",
)
@click.option(
    "--expires",
    metavar="WHEN",
    help="Lift it by itself then: a delay (90d) or a time (ISO 8601 with a zone).",
)
@click.option("--detail", metavar="TEXT", help="A note kept with the entry.")
@click.option(
    "--lane",
    "lanes",
    multiple=True,
    metavar="LANE",
    help="Only mail of this lane: high, normal or low (repeat it for more; none: every lane).",
)
def suppress_add(
    address: str,
    reason: str,
    scope: str,
    expires: str | None,
    detail: str | None,
    lanes: tuple[str, ...],
) -> None:
    """Suppress ADDRESS: mail to it is never attempted (queued mail to it included)."""
    from postlane.clock import parse_when
    from postlane.selectors import suppression_lanes, suppression_scope

    parse_address(address, "address", any_length=True)  # refused before the store opens
    suppression_scope(scope)
    stopped = suppression_lanes(lanes or None)
    until = _until(expires)
    try:
        parse_when(until, "expires")
    except ValidationError:  # a bad value, in the option's words: a usage error (exit 2)
        raise click.BadParameter(
            f"{expires!r} is neither a delay (90d, 12h) nor a time (ISO 8601 with a zone, "
            "or Unix seconds) before the year 10000",
            param_hint="--expires",
        ) from None
    added = with_app(
        lambda app: app.suppress(
            address, reason=reason, scope=scope, expires_at=until, detail=detail, lanes=stopped
        )
    )
    mail = "mail" if stopped is None else f"mail of lane {', '.join(stopped)}"
    if scope != "*":
        mail += f" from {scope}"
    where = "" if mail == "mail" else f" ({mail})"
    click.echo(f"{address}{where}: {'added' if added else 'already suppressed'}", err=True)


def _until(value: str | None) -> str | float | None:
    """``--expires``: a delay from now (``90d``) as Unix seconds, else as given."""
    if value is None:
        return None
    try:
        return time.time() + parse_duration(value)
    except ValueError:
        return value


@suppress.command("remove")
@config_option
@click.argument("address")
@click.option("--scope", metavar="DOMAIN", help="Only the entry for this sender domain (* too).")
@click.option(
    "--reason",
    type=click.Choice(SUPPRESSION_REASONS),
    help="Only the entry for this reason (a mistaken hard_bounce, keeping an unsubscribe).",
)
def suppress_remove(address: str, scope: str | None, reason: str | None) -> None:
    """Remove ADDRESS from the suppression list (in every scope, or --scope's; for every
    reason, or --reason's): mail to it is attempted again (dead letters to it are not
    requeued: `postlane dlq requeue`)."""
    removed = with_app(lambda app: app.unsuppress(address, scope=scope, reason=reason))
    if not removed:
        raise PostlaneError(f"{address} is not on the suppression list")
    click.echo(f"{address}: removed", err=True)
