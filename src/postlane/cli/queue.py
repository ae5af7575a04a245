"""``postlane queue``: look at the queue and act on it (postqueue, postsuper, exim -bp)."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

import click
from rich.padding import Padding
from rich.text import Text

from postlane.app import AsyncPostlane
from postlane.cli.actions import action_command
from postlane.cli.context import config_option, json_option, limit_option, with_app
from postlane.cli.output import (
    first,
    json_or_empty,
    listing,
    out,
    print_json,
    progress_bar,
    reply_code,
    reply_line,
    show,
)
from postlane.cli.selectors import build_selector, selector_options
from postlane.clock import when, when_utc
from postlane.errors import PostlaneError
from postlane.message import NULL_SENDER, RecipientState
from postlane.queue_actions import QueueAction
from postlane.records import MessageView

#: how a recipient's state is coloured in listings
STATE_STYLE = {
    RecipientState.SENT: "green",
    RecipientState.DEAD: "red",
    RecipientState.DEFERRED: "yellow",
    RecipientState.HELD: "magenta",
    RecipientState.SUPPRESSED: "dim",
}


@click.group()
def queue() -> None:
    """Look at and act on the queue (postqueue, postsuper, exim -bp)."""


@queue.command("list")
@config_option
@selector_options
@limit_option(1000)
@json_option
def queue_list(limit: int, as_json: bool, **selectors: Any) -> None:
    """List messages not yet finished (--state sent/dead for the others)."""
    selector = build_selector(**selectors)
    found = with_app(lambda app: app.messages(selector, limit=limit + 1))
    messages = first(found, limit, "messages")
    narrowed = any(value not in (None, (), False) for value in selectors.values())
    # "empty" with a --domain that matches nothing read as an empty queue at 3 a.m.
    empty = "No message matches the selection" if narrowed else "Mail queue is empty"
    if json_or_empty(messages, as_json=as_json, empty=empty):
        return
    now = time.time()
    columns = ("Queue ID", "Lane", "Size", "Arrival (UTC)", "Sender / Recipients")
    table = listing(*columns, wrap={"Sender / Recipients"})
    for message in messages:
        table.add_row(
            message.id,
            message.lane.value,
            str(message.size),
            when(message.created_at),
            _recipients_cell(message, now),
        )
    show(table)
    total = sum(len(m.recipients) for m in messages)
    size_kb = sum(m.size for m in messages) / 1024
    shown = " shown" if len(found) > limit else ""
    out.print(f"-- {size_kb:.0f} Kbytes in {len(messages)} messages{shown}, {total} recipients")


def _recipients_cell(message: MessageView, now: float) -> Text:
    cell = Text(message.sender or NULL_SENDER)
    for r in message.recipients:
        cell.append(f"\n  {r.address} ", style="")
        cell.append(f"[{r.state.value}", style=STATE_STYLE.get(r.state, ""))
        if r.attempts:
            cell.append(f", {r.attempts} attempt(s)")
        if r.state is RecipientState.DEFERRED and r.next_attempt_at:
            cell.append(f", next {when_utc(r.next_attempt_at)}")
        elif r.state is RecipientState.QUEUED and r.next_attempt_at and r.next_attempt_at > now:
            # not due yet: scheduled (send_at), or held back by its destination's limits
            label = "send at" if message.send_at == r.next_attempt_at else "next"
            cell.append(f", {label} {when_utc(r.next_attempt_at)}")
        cell.append("]", style=STATE_STYLE.get(r.state, ""))
        if r.last_response is not None and r.state is not RecipientState.SENT:
            reply = r.last_response
            cell.append(f"\n    ({reply_line(reply.code, reply.enhanced, reply.text)})")
    return cell


@queue.command("show")
@config_option
@click.argument("queue_id", metavar="ID")
@click.option("--raw", is_flag=True, help="Print the stored message bytes (postcat -q).")
@json_option
def queue_show(queue_id: str, raw: bool, as_json: bool) -> None:
    """One message and each recipient's attempt history."""
    if raw:
        content = with_app(lambda app: app.content(queue_id))
        sys.stdout.buffer.write(content)
        return
    message = with_app(lambda app: app.get(queue_id, history=True))
    if as_json:
        print_json(message.as_json())
        return
    out.print(f"[bold]{message.id}[/]  {message.state.value}  lane {message.lane.value}")
    for label, value in (
        ("Message-ID", message.message_id),
        ("From", message.sender or NULL_SENDER),
        ("Subject", message.subject),
        ("Arrived", when_utc(message.created_at)),
        ("Send at", when_utc(message.send_at) if message.send_at is not None else None),
        ("Expires", when_utc(message.expires_at) if message.expires_at is not None else None),
        ("Size", f"{message.size} bytes"),
        ("Idempotency key", message.idempotency_key or "-"),
    ):
        if value is not None:  # a schedule only when the message has one
            out.print(f"  {label + ':':<17}{value}".rstrip(), markup=False)
    if message.metadata:
        out.print(f"  {'Metadata:':<17}{json.dumps(dict(message.metadata))}", markup=False)
    for r in message.recipients:
        out.print()
        line = Text(f"  {r.address}  ")
        line.append(r.state.value, style=STATE_STYLE.get(r.state, ""))
        line.append(f"  attempts {r.attempts}  destination {r.destination}")
        if r.state in (RecipientState.DEFERRED, RecipientState.QUEUED) and r.next_attempt_at:
            line.append(f"  next {when_utc(r.next_attempt_at)}")
        if r.reason:
            line.append(f"  ({r.reason})")
        out.print(line)
        if r.history:
            table = listing("at (UTC)", "class", "code", "text", "ms", "relay", right={"ms"})
            table.header_style = "dim"
            for a in r.history:
                code = reply_code(a.code, a.enhanced)
                table.add_row(when(a.at), a.cls.value, code, a.text, str(a.duration_ms), a.relay)
            show(Padding(table, (0, 0, 0, 4), expand=False))


queue.add_command(
    action_command(
        "flush",
        QueueAction.FLUSH,
        "Make deferred deliveries due now (postqueue -f; with IDs, postqueue -i).",
        required=False,
    )
)
queue.add_command(
    action_command(
        "hold", QueueAction.HOLD, "Hold deliveries: not attempted until released (postsuper -h)."
    )
)
queue.add_command(
    action_command(
        "release", QueueAction.RELEASE, "Release held deliveries, due now (postsuper -H)."
    )
)
queue.add_command(
    action_command(
        "delete",
        QueueAction.DELETE,
        "Delete deliveries, showing what and asking first (postsuper -d).",
        destructive=True,
    )
)


@queue.command("import")
@config_option
@click.argument("path", metavar="FILE")
def queue_import(path: str) -> None:
    """Bring back what `queue delete --export` wrote ('-': stdin). Every line is checked
    before anything is stored: a bad line imports nothing."""
    from postlane.exports import check_export

    try:
        handle = _spool_stdin() if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise PostlaneError(f"cannot read {path}: {exc.strerror}") from None
    try:
        try:
            messages = check_export(handle)
        except UnicodeDecodeError:
            raise PostlaneError(f"{path}: not UTF-8 text (not a postlane export)") from None
        handle.seek(0)
        restored = with_app(lambda app: _import_with_progress(app, handle, messages))
    finally:
        handle.close()
    click.echo(f"imported {restored:,} recipient(s)", err=True)


async def _import_with_progress(app: AsyncPostlane, lines: IO[str], messages: int) -> int:
    """``app.import_`` with a progress bar by message on a terminal: an import of 300,000
    recipients took 90 s in silence (a scale audit)."""
    with progress_bar() as bar:
        task = bar.add_task("import (messages)", total=messages)
        done = 0

        def counted(record: str) -> str:
            nonlocal done
            if record.strip():
                done += 1
                if done % 100 == 0:
                    bar.update(task, completed=done)
            return record

        return await app.import_(counted(line) for line in lines)


def _spool_stdin() -> IO[str]:
    """stdin's bytes in a temporary file, to be read twice (checked, then imported)."""
    import io
    import shutil
    import tempfile

    spool = tempfile.TemporaryFile()  # noqa: SIM115
    shutil.copyfileobj(sys.stdin.buffer, spool)
    spool.seek(0)
    return io.TextIOWrapper(spool, encoding="utf-8")
