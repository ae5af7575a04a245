"""``postlane feedback``: the reports the bounce listener (or a provider's webhook) could not
match to a delivery, kept for an operator to look at: auto-replies, humans' replies, bounces
about mail postlane never sent, unreadable messages."""

from __future__ import annotations

import sys

import click

from postlane.cli.context import config_option, json_option, limit_option, read_first, with_app
from postlane.cli.output import first_line, json_or_empty, listing, print_json, show
from postlane.clock import when, when_utc


@click.group()
def feedback() -> None:
    """What came back after the first hop and matched no delivery (kept for review)."""


@feedback.command("list")
@config_option
@limit_option(100)
@json_option
def feedback_list(limit: int, as_json: bool) -> None:
    """The unmatched reports, newest first, each with why nothing matched."""
    reports = read_first(lambda app, n: app.store.list_unmatched(limit=n), limit, "reports")
    if json_or_empty(reports, as_json=as_json, empty="No unmatched reports"):
        return
    table = listing("id", "received (UTC)", "source", "kind", "from", "to", "size", "why",
                    right={"id", "size"})  # fmt: skip
    for r in reports:
        table.add_row(
            str(r.id),
            when(r.received_at),
            r.source,
            r.kind,
            r.mail_from or "<>",
            r.rcpt_to or "-",
            f"{r.size:,}",
            first_line(r.reason),
        )
    show(table)


@feedback.command("show")
@config_option
@click.argument("report_id", metavar="ID", type=int)
@click.option("--raw", is_flag=True, help="Print the report's bytes as received.")
@json_option
def feedback_show(report_id: int, raw: bool, as_json: bool) -> None:
    """One unmatched report: where it came from, why nothing matched, and what it says."""
    report = with_app(lambda app: app.store.get_unmatched(report_id))
    content = report.content or b""
    if raw:
        sys.stdout.buffer.write(content)
        return
    if as_json:
        print_json({**report.as_json(), "content": content.decode("utf-8", "replace")})
        return
    received = when_utc(report.received_at)
    click.echo(f"report {report.id}  {received}  {report.source}  {report.kind}")
    click.echo(
        f"from {report.mail_from or '<>'} to {report.rcpt_to or '-'}  ({report.size:,} bytes)"
    )
    click.echo(f"why: {report.reason}")
    click.echo()
    click.echo(content.decode("utf-8", "replace"))
