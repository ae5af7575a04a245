"""The ``postlane`` command line: argument parsing and output, nothing else.

Every command calls the same :class:`postlane.app.AsyncPostlane` the HTTP API calls. Listings take
``--json`` (one JSON document on stdout). Errors are one line on stderr and a non-zero exit; a
traceback only with ``--debug`` (or ``POSTLANE_DEBUG=1``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from postlane.app import QSHAPE_EDGES, AsyncPostlane, QueueAction
from postlane.classify import ReplyClass, classify
from postlane.clock import when
from postlane.config import Config, format_duration, load_config, parse_duration, parse_listen
from postlane.errors import PostlaneError, ValidationError
from postlane.message import Attachment, Lane, Message, RecipientState
from postlane.records import MessageView, SelectionCount, Selector, ShapeRow

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

out = Console(highlight=False, soft_wrap=True)


# -- plumbing ----------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.config_path: str | None = None
        self.debug = False
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(_State).config_path = value
    return value


def config_option(func: F) -> F:
    """``--config`` accepted after the command too (``postlane queue list --config x.toml``)."""
    return click.option(
        "--config",
        "config_after",
        metavar="PATH",
        expose_value=False,
        is_eager=True,
        callback=_remember_config,
        help="Configuration file (also accepted before the command).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(
        func
    )


def state() -> _State:
    return click.get_current_context().ensure_object(_State)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (a third less CPU per message than asyncio's own
    loop, measured with benchmarks/deliver.py), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _with_app(action: Callable[[AsyncPostlane], Coroutine[Any, Any, T]]) -> T:
    async with AsyncPostlane(state().config()) as app:
        return await action(app)


def with_app(action: Callable[[AsyncPostlane], Coroutine[Any, Any, T]]) -> T:
    return run_async(_with_app(action))


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def age(seconds: float) -> str:
    return format_duration(seconds) if seconds > 0 else "0s"


def _lanes(values: Sequence[str]) -> tuple[Lane, ...]:
    try:
        return tuple(Lane(v.lower()) for v in values)
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (lanes are high, normal, low)") from None


def _states(values: Sequence[str]) -> tuple[RecipientState, ...]:
    try:
        return tuple(RecipientState(v.lower()) for v in values)
    except ValueError:
        known = ", ".join(s.value for s in RecipientState)
        raise click.BadParameter(f"unknown state (states are {known})") from None


def _classes(values: Sequence[str]) -> tuple[ReplyClass, ...]:
    try:
        return tuple(ReplyClass(v.lower()) for v in values)
    except ValueError:
        known = ", ".join(c.value for c in ReplyClass)
        raise click.BadParameter(f"unknown class (classes are {known})") from None


def _older_than(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    import time

    return time.time() - seconds


def selector_options(func: F) -> F:
    """exiqgrep's habits: every selector narrows the set."""
    return _selector_options(func, states=True)


def dead_letter_selector_options(func: F) -> F:
    """The selectors of dead letters: no ``--state``, a dead letter is always ``dead``."""
    return _selector_options(func, states=False)


def _selector_options(func: F, *, states: bool) -> F:
    options = [
        click.option("--lane", "lanes", multiple=True, help="high, normal or low (repeatable)."),
    ]
    if states:
        options.append(
            click.option("--state", "states", multiple=True, help="Recipient state (repeatable).")
        )
    options += [
        click.option("--domain", "domains", multiple=True, help="Recipient domain (repeatable)."),
        click.option("--class", "classes", multiple=True, help="Class of the last reply."),
        click.option("--older-than", metavar="DURATION", help='Arrived before, e.g. "2h".'),
        click.option("--sender", metavar="ADDR", help="Envelope sender."),
        click.option("--recipient", metavar="ADDR", help="Recipient address."),
        click.option(
            "--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Metadata match."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_selector(
    ids: Sequence[str] = (),
    *,
    all_: bool = False,
    lanes: Sequence[str] = (),
    states: Sequence[str] = (),
    domains: Sequence[str] = (),
    classes: Sequence[str] = (),
    older_than: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    metadata: Sequence[str] = (),
) -> Selector:
    pairs: dict[str, str] = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    return Selector(
        ids=tuple(ids),
        all=all_,
        lanes=_lanes(lanes),
        states=_states(states),
        domains=tuple(d.lower() for d in domains),
        classes=_classes(classes),
        older_than=_older_than(older_than),
        sender=sender,
        recipient=recipient,
        metadata=pairs,
    )


# -- the group ---------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    metavar="PATH",
    envvar="POSTLANE_CONFIG",
    help="Configuration file (default: $POSTLANE_CONFIG, else ./postlane.toml, else defaults).",
)
@click.option("--debug", is_flag=True, envvar="POSTLANE_DEBUG", help="Tracebacks and debug logs.")
@click.version_option(package_name="postlane")
@click.pass_context
def cli(ctx: click.Context, config: str | None, debug: bool) -> None:
    """postlane: a durable outbound email queue."""
    st = ctx.ensure_object(_State)
    if config is not None and st.config_path is None:
        st.config_path = config
    st.debug = debug


def _setup_logging(debug: bool) -> None:
    from postlane.logs import setup_logging

    setup_logging(state().config().log, debug=debug)


# -- serve, worker -----------------------------------------------------------------------------


@cli.command()
@config_option
def serve() -> None:
    """Worker + HTTP API + metrics + SMTP submission, in one process."""
    from postlane import serve as service

    st = state()
    _setup_logging(st.debug)
    run_async(service.run(st.config(), ingest=True))


@cli.command()
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

    st = state()
    _setup_logging(st.debug)
    if burst:
        run_async(_burst(st.config()))
    else:
        if metrics_listen is not None:
            from postlane.config import parse_listen

            try:
                parse_listen(metrics_listen)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--metrics") from None
        run_async(service.run(st.config(), ingest=False, metrics_listen=metrics_listen))


async def _burst(config: Config) -> None:
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


# -- send --------------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None


def _text(path: str) -> str:
    try:
        return _read(path).decode("utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text") from None


def _headers(values: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not 'Name: value'", param_hint="--header")
        headers[name.strip()] = value.strip()
    return headers


@cli.command()
@config_option
@click.option("--from", "sender", metavar="ADDR", help="Sender (taken from --eml when omitted).")
@click.option("--to", "to", multiple=True, metavar="ADDR", help="Recipient (repeatable).")
@click.option("--cc", multiple=True, metavar="ADDR", help="Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, metavar="ADDR", help="Bcc recipient, never in headers.")
@click.option("--subject", help="Subject line.")
@click.option("--text", help="Plain-text body.")
@click.option("--text-file", metavar="FILE", help="Plain-text body from a file ('-': stdin).")
@click.option("--html-file", metavar="FILE", help="HTML body from a file.")
@click.option("--eml", metavar="FILE", help="A complete RFC 5322 message ('-': stdin).")
@click.option("--attach", multiple=True, metavar="FILE", help="Attach a file (repeatable).")
@click.option("--lane", default="normal", show_default=True, help="high, normal or low.")
@click.option("--idempotency-key", metavar="KEY", help="Enqueue at most once per key.")
@click.option("--header", "header", multiple=True, metavar='"K: V"', help="Extra header.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Free metadata.")
@json_option
def send(
    sender: str | None,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    subject: str | None,
    text: str | None,
    text_file: str | None,
    html_file: str | None,
    eml: str | None,
    attach: tuple[str, ...],
    lane: str,
    idempotency_key: str | None,
    header: tuple[str, ...],
    metadata: tuple[str, ...],
    as_json: bool,
) -> None:
    """Enqueue a message; prints its id once it is durably stored."""
    if text is not None and text_file is not None:
        raise click.UsageError("give --text or --text-file, not both")
    meta: dict[str, str] = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--metadata")
        meta[key] = value
    if eml is not None:
        message = Message(
            sender=sender or "",
            to=to,
            cc=cc,
            bcc=bcc,
            raw=_read(eml),
            lane=lane,
            idempotency_key=idempotency_key,
            metadata=meta,
        )
        if subject or text or text_file or html_file or header or attach:
            raise click.UsageError("--eml carries its own subject, body and headers")
    else:
        if not sender:
            raise click.UsageError("--from is required (or give --eml)")
        body = _text(text_file) if text_file else text
        if body is None and html_file is None and not attach and not sys.stdin.isatty():
            body = sys.stdin.read()
        message = Message(
            sender=sender,
            to=to,
            cc=cc,
            bcc=bcc,
            subject=subject,
            text=body,
            html=_text(html_file) if html_file else None,
            attachments=[_attachment(path) for path in attach],
            headers=_headers(header),
            lane=lane,
            idempotency_key=idempotency_key,
            metadata=meta,
        )

    result = with_app(lambda app: app.send(message))
    if as_json:
        print_json(result.as_json())
    else:
        click.echo(result.id)
        if result.duplicate:
            click.echo(f"duplicate: idempotency key already used by {result.id}", err=True)


def _attachment(path: str) -> Attachment:
    import mimetypes

    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Attachment(filename=Path(path).name, content=_read(path), content_type=content_type)


# -- queue -------------------------------------------------------------------------------------


@cli.group()
def queue() -> None:
    """Look at and act on the queue (postqueue, postsuper, exim -bp)."""


@queue.command("list")
@config_option
@selector_options
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000))
@json_option
def queue_list(limit: int, as_json: bool, **selectors: Any) -> None:
    """List messages not yet finished (--state sent/dead for the others)."""
    selector = build_selector(**selectors)
    messages = with_app(lambda app: app.messages(selector, limit=limit))
    if as_json:
        print_json([m.as_json() for m in messages])
        return
    if not messages:
        out.print("Mail queue is empty")
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in ("Queue ID", "Lane", "Size", "Arrival", "Sender / Recipients"):
        table.add_column(column, no_wrap=column != "Sender / Recipients")
    for message in messages:
        table.add_row(
            message.id,
            message.lane.value,
            str(message.size),
            when(message.created_at),
            _recipients_cell(message),
        )
    out.print(table)
    total = sum(len(m.recipients) for m in messages)
    size_kb = sum(m.size for m in messages) / 1024
    out.print(f"-- {size_kb:.0f} Kbytes in {len(messages)} messages, {total} recipients")


def _recipients_cell(message: MessageView) -> Text:
    cell = Text(message.sender)
    for r in message.recipients:
        cell.append(f"\n  {r.address} ", style="")
        cell.append(f"[{r.state.value}", style=_STATE_STYLE.get(r.state, ""))
        if r.attempts:
            cell.append(f", {r.attempts} attempt(s)")
        if r.state is RecipientState.DEFERRED and r.next_attempt_at:
            cell.append(f", next {when(r.next_attempt_at)}")
        cell.append("]", style=_STATE_STYLE.get(r.state, ""))
        if r.last_response is not None and r.state is not RecipientState.SENT:
            reply = r.last_response
            code = " ".join(str(x) for x in (reply.code, reply.enhanced) if x)
            cell.append(
                f"\n    ({code} {reply.text.splitlines()[0] if reply.text else ''})".rstrip()
            )
    return cell


_STATE_STYLE = {
    RecipientState.SENT: "green",
    RecipientState.DEAD: "red",
    RecipientState.DEFERRED: "yellow",
    RecipientState.HELD: "magenta",
    RecipientState.SUPPRESSED: "dim",
}


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
        ("From", message.sender),
        ("Subject", message.subject),
        ("Arrived", when(message.created_at)),
        ("Size", f"{message.size} bytes"),
        ("Idempotency key", message.idempotency_key or "-"),
    ):
        out.print(f"  {label + ':':<17}{value}", markup=False)
    if message.metadata:
        out.print(f"  {'Metadata:':<17}{json.dumps(dict(message.metadata))}", markup=False)
    for r in message.recipients:
        out.print()
        line = Text(f"  {r.address}  ")
        line.append(r.state.value, style=_STATE_STYLE.get(r.state, ""))
        line.append(f"  attempts {r.attempts}  destination {r.destination}")
        if r.state in (RecipientState.DEFERRED, RecipientState.QUEUED) and r.next_attempt_at:
            line.append(f"  next {when(r.next_attempt_at)}")
        if r.reason:
            line.append(f"  ({r.reason})")
        out.print(line)
        if r.history:
            table = Table(box=None, show_edge=False, padding=(0, 1), header_style="dim")
            for column in ("at", "class", "code", "text", "ms", "relay"):
                table.add_column(column)
            for a in r.history:
                code = " ".join(str(x) for x in (a.code, a.enhanced) if x)
                table.add_row(when(a.at), a.cls.value, code, a.text, str(a.duration_ms), a.relay)
            out.print(table)


# -- stats -------------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option("--shape", is_flag=True, help="Age buckets by destination domain (qshape).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@json_option
def stats(shape: bool, limit: int, as_json: bool) -> None:
    """Depth and oldest age by lane, counts by state; --shape for where the backlog sits."""
    if shape:
        _print_shape(with_app(lambda app: app.shape(limit=limit)), as_json)
        return
    result = with_app(lambda app: app.stats())
    if as_json:
        print_json(result.as_json())
        return
    table = Table(header_style="bold")
    for column in ("lane", "ready", "deferred", "held", "sending", "oldest"):
        table.add_column(column, justify="right" if column != "lane" else "left")
    for lane in Lane:
        s = result.lanes[lane]
        table.add_row(
            lane.value,
            str(s.ready),
            str(s.deferred),
            str(s.held),
            str(s.sending),
            age(s.oldest_age_seconds),
        )
    out.print(table)
    out.print(
        f"sent {result.sent}   dead {result.dead}   suppressed {result.suppressed}   "
        f"suppression list {result.suppression_list}"
    )
    if result.destinations:
        busy = Table(box=None, show_edge=False, header_style="bold", pad_edge=False)
        for column in ("destination", "in flight", "rate/s", "paused until", "why"):
            busy.add_column(column)
        for d in result.destinations:
            busy.add_row(
                d.destination,
                str(d.in_flight),
                "-" if d.rate is None else f"{d.rate:.1f}",
                when(d.paused_until),
                d.reason or "",
            )
        out.print()
        out.print(busy)


def _print_shape(rows: Sequence[ShapeRow], as_json: bool) -> None:
    if as_json:
        print_json([row.as_json(QSHAPE_EDGES) for row in rows])
        return
    labels = [f"{int(e // 60)}" for e in QSHAPE_EDGES] + [f"{int(QSHAPE_EDGES[-1] // 60)}+"]
    table = Table(box=None, show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("domain")
    table.add_column("T", justify="right")
    for label in labels:
        table.add_column(label, justify="right")
    totals = [sum(row.buckets[i] for row in rows) for i in range(len(labels))]
    table.add_row("TOTAL", str(sum(r.total for r in rows)), *map(str, totals), style="bold")
    for row in rows:
        table.add_row(row.domain, str(row.total), *map(str, row.buckets))
    out.print("waiting recipients by domain and age in minutes (qshape)")
    out.print(table)


# -- classify ----------------------------------------------------------------------------------


@cli.command("classify")
@config_option
@click.argument("reply")
@json_option
def classify_command(reply: str, as_json: bool) -> None:
    """Classify one server reply ('-' reads it from stdin) and say which rule decided."""
    if reply == "-":
        reply = sys.stdin.read()
    reply = reply.replace("\\r\\n", "\n").replace("\\n", "\n")
    verdict = classify(reply)
    if as_json:
        data = {"class": verdict.cls.value, "code": verdict.code, "enhanced": verdict.enhanced}
        data["rule"] = verdict.rule
        explanation = getattr(verdict, "explanation", "")
        if explanation:
            data["explanation"] = explanation
        print_json(data)
        return
    code = " ".join(str(x) for x in (verdict.code, verdict.enhanced) if x) or "no code"
    out.print(f"[bold]{verdict.cls.value}[/]  ({code})", markup=True)
    explanation = getattr(verdict, "explanation", "") or ""
    out.print(f"rule: {verdict.rule}" + (f": {explanation}" if explanation else ""), markup=False)


# -- dead letters ------------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Dead letters: recipients that will not be retried, with their full failure context."""


@dlq.command("list")
@config_option
@dead_letter_selector_options
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000))
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
    if not rows:
        groups = with_app(lambda app: app.dead_groups(selector, limit=limit))
        if as_json:
            print_json([g.as_json() for g in groups])
            return
        if not groups:
            out.print("No dead letters")
            return
        table = Table(box=None, show_edge=False, header_style="bold")
        for column in ("Count", "Class", "Domain", "Reply", "Last died", "e.g."):
            table.add_column(column, justify="right" if column == "Count" else "left")
        for g in groups:
            code = " ".join(str(x) for x in (g.code, g.enhanced) if x)
            reply = f"{code} {g.reply.splitlines()[0] if g.reply else ''}".strip()
            table.add_row(
                f"{g.count:,}", g.cls.value, g.domain, reply, when(g.last_dead_at), g.sample_id
            )
        out.print(table)
        out.print(
            f"-- {sum(g.count for g in groups):,} dead recipient(s) in {len(groups)} group(s)"
        )
        return
    letters = with_app(lambda app: app.dead_letters(selector, limit=limit))
    if as_json:
        print_json([d.as_json() for d in letters])
        return
    if not letters:
        out.print("No dead letters")
        return
    table = Table(box=None, show_edge=False, header_style="bold")
    for column in ("Queue ID", "Recipient", "Class", "Attempts", "Died", "Last reply"):
        table.add_column(column, no_wrap=column != "Last reply")
    for d in letters:
        last = d.last_response
        text = ""
        if last is not None:
            text = " ".join(str(x) for x in (last.code, last.enhanced) if x)
            text = f"{text} {last.text.splitlines()[0] if last.text else ''}".strip()
        if d.reason and not text:
            text = d.reason
        table.add_row(d.id, d.address, d.cls.value, str(d.attempts), when(d.dead_at), text)
    out.print(table)
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
        out.print(f"[bold]{d.id}[/] {d.address}  [red]{d.cls.value}[/]  died {when(d.dead_at)}")
        out.print(f"  from {d.sender}, subject {d.subject!r}, lane {d.lane.value}", markup=False)
        if d.reason:
            out.print(f"  reason: {d.reason}", markup=False)
        for a in d.history or ():
            code = " ".join(str(x) for x in (a.code, a.enhanced) if x)
            out.print(
                f"  {when(a.at)}  {a.cls.value:<13} {code:<10} {a.text}  "
                f"[{a.relay} -> {a.destination}, {a.duration_ms} ms]",
                markup=False,
            )


# -- suppression -------------------------------------------------------------------------------


@cli.group()
def suppress() -> None:
    """The suppression list: addresses never attempted again (hard bounces land here)."""


@suppress.command("list")
@config_option
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@json_option
def suppress_list(limit: int, as_json: bool) -> None:
    entries = with_app(lambda app: app.suppressions(limit=limit))
    if as_json:
        print_json([e.as_json() for e in entries])
        return
    if not entries:
        out.print("The suppression list is empty")
        return
    table = Table(box=None, show_edge=False, header_style="bold")
    for column in ("Address", "Since", "Source", "Reason"):
        table.add_column(column)
    for e in entries:
        reason = e.text or e.reason or ""
        table.add_row(
            e.address, when(e.created_at), e.source, reason.splitlines()[0] if reason else ""
        )
    out.print(table)


@suppress.command("add")
@config_option
@click.argument("address")
@click.option("--reason", help="Why (kept with the entry).")
def suppress_add(address: str, reason: str | None) -> None:
    added = with_app(lambda app: app.suppress(address, reason=reason))
    click.echo(f"{address}: {'added' if added else 'already suppressed'}")


@suppress.command("remove")
@config_option
@click.argument("address")
def suppress_remove(address: str) -> None:
    removed = with_app(lambda app: app.unsuppress(address))
    if not removed:
        raise PostlaneError(f"{address} is not on the suppression list")
    click.echo(f"{address}: removed")


# -- operator actions --------------------------------------------------------------------------

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _targets(
    ids: Sequence[str], all_: bool, selectors: dict[str, Any], *, required: bool
) -> Selector:
    if ids and all_:
        raise click.UsageError("give message IDs or --all, not both")
    if required and not ids and not all_:
        raise click.UsageError("give message IDs, or --all (selectors then narrow it)")
    return build_selector(ids, all_=all_, **selectors)


def _show_selection(action: QueueAction, counts: Sequence[SelectionCount]) -> int:
    total = sum(c.count for c in counts)
    table = Table(box=None, show_edge=False, header_style="bold", pad_edge=False)
    for column in ("lane", "domain", "state", "last class", "recipients"):
        table.add_column(column, justify="right" if column == "recipients" else "left")
    for c in counts[:30]:
        table.add_row(
            c.lane.value, c.domain, c.state.value, c.cls.value if c.cls else "-", f"{c.count:,}"
        )
    if len(counts) > 30:
        rest = sum(c.count for c in counts[30:])
        table.add_row("...", f"({len(counts) - 30} more groups)", "", "", f"{rest:,}")
    err.print(f"{action.value} will touch {total:,} recipient(s):")
    err.print(table)
    return total


def run_action(
    action: QueueAction,
    selector: Selector,
    *,
    confirm: bool,
    yes: bool = False,
    export_path: str | None = None,
) -> None:
    """Show what an action touches, ask when it destroys, apply it with progress."""

    async def go(app: AsyncPostlane) -> int:
        counts = await app.summarize(action, selector)
        total = (
            _show_selection(action, counts)
            if (confirm or err.is_terminal)
            else sum(c.count for c in counts)
        )
        if total == 0:
            err.print(f"nothing to {action.value}")
            return 0
        question = f"{action.value.capitalize()} {total:,} recipient(s)?"
        if confirm and not yes and not click.confirm(question, default=False, err=True):
            raise click.Abort()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as bar:
            task = bar.add_task(action.value, total=total)
            return await app.act(
                action,
                selector,
                export=export,
                progress=lambda n: bar.update(task, completed=n),
            )

    try:
        export = open(export_path, "a", encoding="utf-8") if export_path else None  # noqa: SIM115
    except OSError as exc:
        raise PostlaneError(f"cannot write {export_path}: {exc.strerror}") from None
    try:
        done = with_app(go)
    finally:
        if export is not None:
            export.close()
    past = {
        "flush": "flushed",
        "hold": "held",
        "release": "released",
        "delete": "deleted",
        "requeue": "requeued",
        "purge": "purged",
    }[action.value]
    suffix = f" (exported to {export_path})" if export_path else ""
    click.echo(f"{past} {done:,} recipient(s){suffix}", err=True)


def action_options(func: F) -> F:
    return _action_options(selector_options(func))


def dead_letter_action_options(func: F) -> F:
    return _action_options(dead_letter_selector_options(func))


def _action_options(func: F) -> F:
    func = click.option("--all", "all_", is_flag=True, help="Every message (selectors narrow).")(
        func
    )
    func = click.argument("ids", nargs=-1, metavar="[ID]...")(func)
    return config_option(func)


@queue.command("flush")
@action_options
def queue_flush(ids: tuple[str, ...], all_: bool, **selectors: Any) -> None:
    """Make deferred deliveries due now (postqueue -f; with IDs, postqueue -i)."""
    run_action(QueueAction.FLUSH, _targets(ids, all_, selectors, required=False), confirm=False)


@queue.command("hold")
@action_options
def queue_hold(ids: tuple[str, ...], all_: bool, **selectors: Any) -> None:
    """Hold deliveries: not attempted until released (postsuper -h)."""
    run_action(QueueAction.HOLD, _targets(ids, all_, selectors, required=True), confirm=False)


@queue.command("release")
@action_options
def queue_release(ids: tuple[str, ...], all_: bool, **selectors: Any) -> None:
    """Release held deliveries, due now (postsuper -H)."""
    run_action(QueueAction.RELEASE, _targets(ids, all_, selectors, required=True), confirm=False)


@queue.command("delete")
@action_options
@click.option("--export", "export_path", metavar="FILE", help="Write what is deleted (JSON Lines).")
@click.option("--yes", is_flag=True, help="Do not ask.")
def queue_delete(
    ids: tuple[str, ...], all_: bool, export_path: str | None, yes: bool, **selectors: Any
) -> None:
    """Delete deliveries, showing what and asking first (postsuper -d)."""
    selector = _targets(ids, all_, selectors, required=True)
    run_action(QueueAction.DELETE, selector, confirm=True, yes=yes, export_path=export_path)


@queue.command("import")
@config_option
@click.argument("path", metavar="FILE")
def queue_import(path: str) -> None:
    """Bring back what `queue delete --export` wrote ('-': stdin). Every line is checked
    before anything is stored: a bad line imports nothing."""
    from postlane.app import check_export

    try:
        handle = _spool_stdin() if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise PostlaneError(f"cannot read {path}: {exc.strerror}") from None
    try:
        try:
            check_export(handle)
        except UnicodeDecodeError:
            raise PostlaneError(f"{path}: not UTF-8 text (not a postlane export)") from None
        handle.seek(0)
        restored = with_app(lambda app: app.import_(handle))
    finally:
        handle.close()
    click.echo(f"imported {restored:,} recipient(s)", err=True)


def _spool_stdin() -> IO[str]:
    """stdin's bytes in a temporary file, to be read twice (checked, then imported)."""
    import io
    import shutil
    import tempfile

    spool = tempfile.TemporaryFile()  # noqa: SIM115
    shutil.copyfileobj(sys.stdin.buffer, spool)
    spool.seek(0)
    return io.TextIOWrapper(spool, encoding="utf-8")


@dlq.command("requeue")
@dead_letter_action_options
def dlq_requeue(ids: tuple[str, ...], all_: bool, **selectors: Any) -> None:
    """Give dead letters a fresh start: attempts reset, due now (postsuper -r)."""
    run_action(QueueAction.REQUEUE, _targets(ids, all_, selectors, required=True), confirm=False)


@dlq.command("purge")
@dead_letter_action_options
@click.option("--export", "export_path", metavar="FILE", help="Write what is purged (JSON Lines).")
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(
    ids: tuple[str, ...], all_: bool, export_path: str | None, yes: bool, **selectors: Any
) -> None:
    """Drop dead letters for good, showing what and asking first."""
    selector = _targets(ids, all_, selectors, required=True)
    run_action(QueueAction.PURGE, selector, confirm=True, yes=yes, export_path=export_path)


# -- alerts ------------------------------------------------------------------------------------


@cli.command("alerts")
@config_option
@click.option(
    "--prometheus-rules", "rules", is_flag=True, help="Print the rules as a Prometheus rules file."
)
@json_option
def alerts_command(rules: bool, as_json: bool) -> None:
    """Evaluate the alert rules now, on the recorded history (what serve records each minute)."""
    from postlane.alerts import HISTORY_NEEDED, AlertMonitor, evaluate, firing_first
    from postlane.alerts import prometheus_rules as render

    if rules:
        click.echo(render(), nl=False)
        return

    async def go(app: AsyncPostlane) -> list[Any]:
        now = app.clock.now()
        history = await app.store.samples(now - HISTORY_NEEDED)
        if not history or history[-1].at < now - now % 60:  # serve did not record this minute
            history = [*history, *await AlertMonitor(app).sample(now)]
        return firing_first(evaluate(history, now))

    verdicts = with_app(go)
    if as_json:
        print_json([a.as_json() for a in verdicts])
        return
    table = Table(box=None, show_edge=False, header_style="bold", pad_edge=False)
    for column in ("state", "alert", "labels", "value", "detail"):
        table.add_column(column)
    for alert in verdicts:
        state_text = Text("FIRING", style="bold red") if alert.firing else Text("ok", style="green")
        labels = ",".join(f"{k}={v}" for k, v in alert.labels.items())
        table.add_row(state_text, alert.rule.name, labels, f"{alert.value:g}", alert.detail)
    out.print(table)
    firing = [a for a in verdicts if a.firing]
    if firing:
        out.print(f"{len(firing)} firing; runbooks:")
        for alert in firing:
            out.print(f"  {alert.rule.name}: {alert.rule.runbook_url}", markup=False)


# -- hash-password -----------------------------------------------------------------------------


@cli.command("hash-password")
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Read the password from stdin (for scripts)."
)
def hash_password_command(from_stdin: bool) -> None:
    """Print a hash for [smtp] users (scrypt, salted): users = { app = "scrypt$..." }."""
    from postlane.ingest.smtp import hash_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        raise click.UsageError("the password is empty")
    click.echo(hash_password(password))


# -- dkim --------------------------------------------------------------------------------------


@cli.group()
def dkim() -> None:
    """DKIM keys for signing what SMTP and MX delivery send."""


@dkim.command("keygen")
@click.argument("domain")
@click.option("--selector", default="postlane", show_default=True, help="DKIM selector.")
@click.option(
    "--out",
    "out_path",
    metavar="FILE",
    help="Where to write the private key (PEM).  [default: dkim/DOMAIN.pem]",
)
@click.option("--bits", default=2048, show_default=True, type=click.IntRange(1024, 4096))
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
@json_option
def dkim_keygen(
    domain: str, selector: str, out_path: str | None, bits: int, force: bool, as_json: bool
) -> None:
    """Make a key pair for DOMAIN: write the private key, print the DNS record to publish."""
    from postlane.dkim import dns_record_name, generate_key, valid_domain, zone_file_entry

    domain = domain.strip().rstrip(".").lower()
    if not valid_domain(domain):
        raise click.UsageError(f"{domain!r} is not a domain name")
    path = Path(out_path) if out_path else Path("dkim") / f"{domain}.pem"
    if path.exists() and not force:
        raise PostlaneError(f"{path} exists: keep it, or pass --force to replace it")
    key = generate_key(domain, selector, bits=bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 from the start: the key is never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_pem)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_TRUNC
    if as_json:
        print_json(
            {
                "domain": domain,
                "selector": selector,
                "private_key": str(path),
                "record_name": dns_record_name(domain, selector),
                "record": key.dns_record,
            }
        )
        return
    click.echo(f"wrote {path} (keep it private: mode 0600)")
    click.echo("publish this TXT record:")
    click.echo(zone_file_entry(domain, selector, key.dns_record))
    click.echo("then configure it:")
    click.echo(f'[dkim."{domain}"]\nselector = "{selector}"\nprivate_key = "{path}"')


# -- simulator ---------------------------------------------------------------------------------


@cli.command("simulate")
@click.option(
    "--listen",
    default="127.0.0.1:2525",
    show_default=True,
    metavar="HOST:PORT",
    help="Where to listen (port 0: any free port, printed at start).",
)
@click.option(
    "--scenario",
    default="accept",
    show_default=True,
    metavar="NAME|FILE",
    help="A built-in scenario (see --list) or a scenario TOML file.",
)
@click.option("--report", "report_path", metavar="FILE", help="Also write the report to FILE.")
@click.option("--duration", metavar="DURATION", help='Stop after this long, e.g. "30s".')
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop once N messages were accepted.",
)
@click.option("--store-dir", metavar="DIR", help="Save each accepted message as DIR/NNNNNNNN.eml.")
@click.option("--seed", type=int, help="Seed for the scenario's randomness (overrides its own).")
@click.option("--list", "list_only", is_flag=True, help="List the built-in scenarios and exit.")
def simulate_command(
    listen: str,
    scenario: str,
    report_path: str | None,
    duration: str | None,
    max_messages: int | None,
    store_dir: str | None,
    seed: int | None,
    list_only: bool,
) -> None:
    """A provider simulator: an SMTP server that answers like Gmail, Microsoft, Yahoo or Postfix.

    Runs until Ctrl-C or SIGTERM (or --duration, or --max-messages), then prints a JSON report
    on stdout: messages accepted, per domain, duplicates by Message-ID, replies by class, and
    accepted messages per second.
    """
    # imported here, not at the top: only this command loads the simulator (and aiosmtpd)
    from postlane.simulate import Scenario, Simulator, builtin_scenarios, run_until_stopped

    if list_only:
        for name in builtin_scenarios():
            click.echo(f"{name:16} {Scenario.load(name).description}")
        return
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    seconds: float | None = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--duration") from None
    if report_path is not None and not Path(report_path).resolve().parent.is_dir():
        raise click.BadParameter(f"no directory for {report_path}", param_hint="--report")
    loaded = Scenario.load(scenario)
    simulator = Simulator(
        loaded, host=host, port=port, seed=seed, store_dir=store_dir, max_messages=max_messages
    )

    def announce(bound_host: str, bound_port: int) -> None:
        click.echo(
            f"postlane simulate: scenario {loaded.name} (seed {simulator.scenario.seed}) "
            f"listening on {bound_host}:{bound_port}; Ctrl-C to stop",
            err=True,
        )

    report = asyncio.run(run_until_stopped(simulator, seconds, announce))
    document = json.dumps(report, indent=2, ensure_ascii=False)
    click.echo(document)
    if report_path is not None:
        try:
            Path(report_path).write_text(document + "\n", encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(
                f"cannot write the report to {report_path}: {exc.strerror}"
            ) from None


# -- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: one line per error, never a traceback unless --debug."""
    debug = os.environ.get("POSTLANE_DEBUG", "") not in ("", "0") or "--debug" in (
        argv if argv is not None else sys.argv[1:]
    )
    for console in (out, err):
        if not console.is_terminal:  # piped: one line per row, never wrapped at 80 columns
            console.width = 250
    try:
        code = cli.main(args=argv, prog_name="postlane", standalone_mode=False)
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


if __name__ == "__main__":
    main()
