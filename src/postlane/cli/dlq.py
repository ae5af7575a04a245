"""``postlane dlq``: dead letters, recipients that will not be retried, with their full failure
context; requeued or purged by the same selectors as the queue's actions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from postlane.cli.actions import action_command
from postlane.cli.context import config_option, json_option, limit_option, read_first, with_app
from postlane.cli.output import (
    json_or_empty,
    listing,
    out,
    print_json,
    reply_code,
    reply_line,
    show,
)
from postlane.cli.selectors import build_selector, dead_letter_selector_options
from postlane.clock import when, when_utc
from postlane.message import NULL_SENDER
from postlane.queue_actions import QueueAction
from postlane.records import DeadGroup, DeadLetter

#: what a listing says when nothing matches, grouped or not
_NO_DEAD_LETTERS = "No dead letters"
#: the reason the store gives a recipient dead-lettered when its expires_at passed
EXPIRED = "expired"


@click.group()
def dlq() -> None:
    """Dead letters: recipients that will not be retried, with their full failure context."""


@dlq.command("list")
@config_option
@dead_letter_selector_options
@limit_option(1000)
@click.option(
    "--rows/--group",
    "rows",
    default=None,
    help="One line per dead recipient, or per group of identical failures (default: group, "
    "except with --json, whose default is the contract's one row per recipient).",
)
@json_option
def dlq_list(limit: int, rows: bool | None, as_json: bool, **selectors: Any) -> None:
    """Dead letters: grouped by class, domain and reply, or one row per recipient."""
    selector = build_selector(**selectors)
    if rows is None:
        rows = as_json
    if rows:
        letters = read_first(
            lambda app, n: app.dead_letters(selector, limit=n), limit, "dead letters"
        )
        if not json_or_empty(letters, as_json=as_json, empty=_NO_DEAD_LETTERS):
            _show_letters(letters)
    else:
        groups = read_first(lambda app, n: app.dead_groups(selector, limit=n), limit, "groups")
        if not json_or_empty(groups, as_json=as_json, empty=_NO_DEAD_LETTERS):
            _show_groups(groups)


def _show_groups(groups: Sequence[DeadGroup]) -> None:
    """One line per group of identical failures, and how many recipients they hold."""
    columns = ("Count", "Class", "Domain", "Reply", "Last died (UTC)", "e.g.")
    table = listing(*columns, right={"Count"})
    for g in groups:
        reply = reply_line(g.code, g.enhanced, g.reply)
        table.add_row(
            f"{g.count:,}", g.cls.value, g.domain, reply, when(g.last_dead_at), g.sample_id
        )
    show(table)
    out.print(f"-- {sum(g.count for g in groups):,} dead recipient(s) in {len(groups)} group(s)")


def _show_letters(letters: Sequence[DeadLetter]) -> None:
    """One line per dead recipient, with its last reply (or, without one, the reason)."""
    columns = ("Queue ID", "Recipient", "Class", "Attempts", "Died (UTC)", "Last reply")
    table = listing(*columns, wrap={"Last reply"})
    for d in letters:
        last = d.last_response
        text = ""
        if last is not None:
            text = reply_line(last.code, last.enhanced, last.text)
        if d.reason == EXPIRED:  # its time ran out: that is why it is here, not the reply
            text = f"{EXPIRED} (last reply: {text})" if text else EXPIRED
        elif d.reason and not text:
            text = d.reason
        table.add_row(d.id, d.address, d.cls.value, str(d.attempts), when(d.dead_at), text)
    show(table)
    out.print(f"-- {len(letters)} dead recipient(s)")


@dlq.command("show")
@config_option
@click.argument("queue_id", metavar="ID")
@json_option
def dlq_show(queue_id: str, as_json: bool) -> None:
    """A message's dead recipients with every attempt."""
    letters = with_app(lambda app: app.dead_letter(queue_id))
    if as_json:
        print_json([d.as_json() for d in letters])
        return
    for d in letters:
        out.print(f"[bold]{d.id}[/] {d.address}  [red]{d.cls.value}[/]  died {when_utc(d.dead_at)}")
        sender = d.sender or NULL_SENDER
        out.print(f"  from {sender}, subject {d.subject!r}, lane {d.lane.value}", markup=False)
        if d.reason:
            out.print(f"  reason: {d.reason}", markup=False)
        for a in d.history or ():
            code = reply_code(a.code, a.enhanced)
            out.print(
                f"  {when_utc(a.at)}  {a.cls.value:<13} {code:<10} {a.text}  "
                f"[{a.relay} -> {a.destination}, {a.duration_ms} ms]",
                markup=False,
            )


dlq.add_command(
    action_command(
        "requeue",
        QueueAction.REQUEUE,
        "Give dead letters a fresh start: attempts reset, due now (postsuper -r). An address "
        "on the suppression list refuses the requeue unless --unsuppress lifts its suppression.",
        dead_letters=True,
    )
)
dlq.add_command(
    action_command(
        "purge",
        QueueAction.PURGE,
        "Drop dead letters for good, showing what and asking first.",
        dead_letters=True,
        destructive=True,
    )
)
