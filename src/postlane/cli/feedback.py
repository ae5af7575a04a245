"""``postlane feedback``: the reports the bounce listener (or a provider's webhook) could not
match to a delivery, kept for an operator to look at: auto-replies, humans' replies, bounces
about mail postlane never sent, unreadable messages, and reports that name a delivery only by
its Message-ID (``feedback apply`` records one once an operator has judged it genuine)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from postlane.cli.context import config_option, json_option, limit_option, read_first, with_app
from postlane.cli.output import first_line, json_or_empty, listing, print_json, show
from postlane.clock import when, when_utc
from postlane.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from postlane.app import AsyncPostlane
    from postlane.feedback.inbound import InboundResult


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


@feedback.command("apply")
@config_option
@click.argument("report_id", metavar="ID", type=int)
def feedback_apply(report_id: int) -> None:
    """Record a kept bounce or complaint as if it had carried its return path: for a report
    matched by Message-ID only, which the listener does not trust by itself ([bounces]
    match_message_id is off). Look at it first (feedback show ID): whoever knows a
    Message-ID can write such a report."""
    result = with_app(lambda app: _apply(app, report_id))
    click.echo(f"report {report_id}: {result.summary()}")


async def _apply(app: AsyncPostlane, report_id: int) -> InboundResult:
    from postlane.feedback.inbound import BounceProcessor

    if app.config.bounces.domain is None:
        raise ConfigError("feedback apply needs [bounces] domain, as the bounce listener does")
    report = await app.store.get_unmatched(report_id)
    if report.source != "bounce listener" or report.content is None:
        raise ValidationError(
            f"report {report_id} came from {report.source}: only what the bounce listener kept "
            "can be applied (a provider's event names its delivery itself)"
        )
    key = await app.store.secret("verp", app.clock.now())
    processor = BounceProcessor.from_config(
        app.config.bounces,
        app.store,
        key,
        clock=app.clock,
        in_flight_wait=0.0,
        match_message_id=True,  # the operator's judgement stands in for the token
    )
    try:
        rcpt_to = [a for a in (report.rcpt_to or "").split(", ") if a]
        result = await processor.process(
            report.content, mail_from=report.mail_from, rcpt_to=rcpt_to
        )
    finally:
        await processor.close()
    if result.recorded or result.duplicates:
        # done with: what is left of it (other recipients' notes) was kept again, as a new report
        await app.store.delete_unmatched(report_id)
        return result
    if result.unmatched_id is not None:
        await app.store.delete_unmatched(result.unmatched_id)  # the same report, kept twice
    raise ValidationError(
        f"report {report_id} was not applied, and stays kept: "
        f"{result.reason or 'it names no delivery that was sent'}"
    )
