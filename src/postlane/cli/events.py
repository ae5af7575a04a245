"""``postlane events``: the event log (what happened to each recipient), as the application
reads it through ``GET /v1/events`` and webhooks; ``--follow`` keeps printing new ones."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from postlane.app import AsyncPostlane, EventPage
from postlane.cli.context import config_option, json_option, limit_option, with_app
from postlane.cli.output import listing, print_json, show
from postlane.clock import when
from postlane.events import EVENT_TYPES, Event


def _cells(event: Event) -> list[str]:
    """One event's columns: id, at, type, message, recipient, lane, reply."""
    reply = " ".join(str(part) for part in (event.code, event.enhanced) if part)
    return [
        str(event.id),
        when(event.at),
        event.type,
        event.queue_id,
        event.recipient or "-",
        event.lane.value,
        reply,
    ]


def _line(event: Event) -> str:
    """One event as a line of text (``--follow``): its columns and its reply's first line."""
    parts = [*_cells(event), (event.text or "").splitlines()[0] if event.text else ""]
    return "  ".join(part for part in parts if part != "")


@click.command("events")
@config_option
@click.option("--after", metavar="ID", help="Only events after this one (a cursor: `next`).")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(EVENT_TYPES),
    help="Only events of this type (repeatable).",
)
@limit_option(100)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing events as they happen (from the newest on, or after --after); "
    "with --json, one JSON object a line.",
)
@json_option
def events_command(
    after: str | None, types: tuple[str, ...], limit: int, follow: bool, as_json: bool
) -> None:
    """The event log, oldest first: queued, sent, deferred, bounced, complained, unsubscribed,
    dead, suppressed, expired."""
    if follow:
        _follow(after, types, as_json)
        return
    if as_json:
        print_json(with_app(lambda app: app.events(after, limit=limit, types=types)).as_json())
        return
    page, at_end = with_app(lambda app: _first_page(app, after, limit, types))
    if not page.events:
        where = f" after {after}" if after else ""
        if not at_end:
            # a typed read scans a slice of the log a page; the rest was not read in time
            click.echo(
                f"No {'/'.join(types)} events{where} up to event {page.next}; read on: "
                f"postlane events --after {page.next} --type {' --type '.join(types)}",
                err=True,
            )
        else:
            click.echo("No events" + where, err=True)
        return
    table = listing("id", "at (UTC)", "type", "message", "recipient", "lane", "reply", right={"id"})
    for event in page.events:
        table.add_row(*_cells(event))
    show(table)
    click.echo(f"next: postlane events --after {page.next}", err=True)


#: how long a typed read pages on through other types' events before it says where it stopped
TYPED_READ_SECONDS = 10.0


async def _first_page(
    app: AsyncPostlane, after: str | None, limit: int, types: tuple[str, ...]
) -> tuple[EventPage, bool]:
    """The first page with events, and whether the log's end was reached: a typed read looks at
    a slice of the log per page (the API's ``next`` says how far it got), so for a person a
    type rare among many others came back empty ("No events", while 120,000 dead events were
    further on: a scale audit). Pages on for at most :data:`TYPED_READ_SECONDS`."""
    deadline = time.monotonic() + TYPED_READ_SECONDS
    page = await app.events(after, limit=limit, types=types)
    while not page.events:
        if not types or page.next == (after or "0"):
            return page, True
        if time.monotonic() >= deadline:
            return page, False
        after = page.next
        page = await app.events(after, limit=limit, types=types)
    return page, False


def _follow(after: str | None, types: tuple[str, ...], as_json: bool) -> None:
    from postlane.webhooks.subscribers import follow_events

    async def go(app: AsyncPostlane) -> None:
        start: Any = "latest" if after is None else int(await _checked(app, after))
        async for event in follow_events(app.store, start, types=types, clock=app.clock):
            if as_json:
                click.echo(json.dumps(event.as_json(), ensure_ascii=False, default=str))
            else:
                click.echo(_line(event))
            sys.stdout.flush()

    try:
        with_app(go)
    except KeyboardInterrupt:  # Ctrl-C ends a follow: not an error
        pass
    except asyncio.CancelledError:
        pass


async def _checked(app: AsyncPostlane, after: str) -> str:
    """``after`` checked as a cursor (a ValidationError names it) before following."""
    await app.events(after, limit=1)
    return after
