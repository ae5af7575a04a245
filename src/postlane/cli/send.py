"""``postlane send``: enqueue one message from the command line (sendmail's job)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click

from postlane.cli.context import config_option, invocation, json_option, with_app
from postlane.cli.output import print_json
from postlane.cli.selectors import lane_choice, metadata_pairs
from postlane.errors import ValidationError
from postlane.message import Message, prepare
from postlane.mime import Attachment
from postlane.toml_values import parse_duration


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


def _when(value: str | None, now: float) -> str | float | None:
    """``--at``/``--expires``: a delay from now (``30m``, ``2h``, ``1d``) as Unix seconds;
    anything else as given (ISO 8601 with a zone, Unix seconds), checked by the message."""
    if value is None:
        return None
    try:
        delay = parse_duration(value)
    except ValueError:
        return value
    return now + delay if any(c.isalpha() for c in value) else value


def _attachment(path: str) -> Attachment:
    import mimetypes

    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Attachment(filename=Path(path).name, content=_read(path), content_type=content_type)


@click.command()
@config_option
@click.option("--from", "sender", metavar="ADDR", help="Sender (taken from --eml when omitted).")
@click.option("--to", "to", multiple=True, metavar="ADDR", help="Recipient (repeatable).")
@click.option("--cc", multiple=True, metavar="ADDR", help="Cc recipient (repeatable).")
@click.option(
    "--bcc", multiple=True, metavar="ADDR", help="Bcc recipient, never in headers (repeatable)."
)
@click.option("--subject", help="Subject line.")
@click.option("--text", help="Plain-text body.")
@click.option("--text-file", metavar="FILE", help="Plain-text body from a file ('-': stdin).")
@click.option("--html", metavar="HTML", help="HTML body (beside --text: both parts).")
@click.option("--html-file", metavar="FILE", help="HTML body from a file.")
@click.option("--eml", metavar="FILE", help="A complete RFC 5322 message ('-': stdin).")
@click.option("--attach", multiple=True, metavar="FILE", help="Attach a file (repeatable).")
@click.option("--lane", default="normal", show_default=True, help="high, normal or low.")
@click.option("--idempotency-key", metavar="KEY", help="Enqueue at most once per key.")
@click.option("--header", "header", multiple=True, metavar='"K: V"', help="Extra header.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Free metadata.")
@click.option(
    "--at",
    "send_at",
    metavar="WHEN",
    help="Not before then: ISO 8601 with a zone (2026-12-24T09:00:00+01:00), Unix seconds, "
    "or a delay (30m, 2h).",
)
@click.option(
    "--expires",
    "expires_at",
    metavar="WHEN",
    help="Never after then (same forms): unsent recipients are dead-lettered, 'expired'.",
)
@json_option
def send(
    sender: str | None,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    subject: str | None,
    text: str | None,
    text_file: str | None,
    html: str | None,
    html_file: str | None,
    eml: str | None,
    attach: tuple[str, ...],
    lane: str,
    idempotency_key: str | None,
    header: tuple[str, ...],
    metadata: tuple[str, ...],
    send_at: str | None,
    expires_at: str | None,
    as_json: bool,
) -> None:
    """Enqueue a message; prints its id once it is durably stored."""
    if text is not None and text_file is not None:
        raise click.UsageError("give --text or --text-file, not both")
    if html is not None and html_file is not None:
        raise click.UsageError("give --html or --html-file, not both")
    now = time.time()
    at, expires = _when(send_at, now), _when(expires_at, now)
    meta = metadata_pairs(metadata)
    lane = lane_choice(lane)
    raw: bytes | None = None
    body = text
    if eml is not None:
        raw = _read(eml)
        if subject or text or text_file or html or html_file or header or attach:
            raise click.UsageError("--eml carries its own subject, body and headers")
    else:
        if not sender:
            raise click.UsageError("--from is required (or give --eml)")
        if text_file:
            body = _text(text_file)
        no_body = body is None and html is None and html_file is None and not attach
        if no_body and not sys.stdin.isatty():
            body = sys.stdin.read()
    # with --eml, every body and header option is unset (checked above)
    message = Message(
        sender=sender or "",
        to=to,
        cc=cc,
        bcc=bcc,
        subject=subject,
        text=body,
        html=_text(html_file) if html_file else html,
        attachments=[_attachment(path) for path in attach],
        headers=_headers(header),
        raw=raw,
        lane=lane,
        idempotency_key=idempotency_key,
        metadata=meta,
        send_at=at,
        expires_at=expires,
    )

    # checked before the store is opened: a bad message is refused whether or not there is one
    config = invocation().config()
    try:
        prepared = prepare(message, max_size=config.smtp.max_size, now=now)
    except ValidationError as exc:  # in the words of the command line
        raise ValidationError(_in_option_words(exc), field=exc.field) from None
    # the store a configuration file names is made by the first send (before serve ever ran),
    # as by the Python API; without one, ./postlane.db is only a guess from the working
    # directory, and a message stored in a new queue there would never be delivered
    [result] = with_app(lambda app: app.send_prepared([prepared]), create=config.from_file)
    if as_json:
        print_json(result.as_json())
    else:
        click.echo(result.id)
        if result.duplicate:
            click.echo(f"duplicate: idempotency key already used by {result.id}", err=True)


#: the option of ``postlane send`` that gives each field of a message
_OPTIONS = {
    "from": "--from",
    "to": "--to",
    "cc": "--cc",
    "bcc": "--bcc",
    "subject": "--subject",
    "text": "--text",
    "html": "--html",
    "raw": "--eml",
    "attachments": "--attach",
    "headers": "--header",
    "lane": "--lane",
    "idempotency_key": "--idempotency-key",
    "metadata": "--metadata",
    "send_at": "--at",
    "expires_at": "--expires",
}
_FIELD_NAMED = re.compile(r"the '(\w+)' field")


def _in_option_words(exc: ValidationError) -> str:
    """A refusal in the command line's words: the option, where the message names a field
    (``use the 'lane' field`` is ``use --lane`` here; ``send_at: ...`` is ``--at: ...``)."""
    text = _FIELD_NAMED.sub(lambda m: _OPTIONS.get(m[1], m[0]), exc.message)
    text = text.replace("cannot be set in headers", "cannot be set with --header")
    if exc.field in ("send_at", "expires_at"):
        text = text.replace(exc.field, _OPTIONS[exc.field])
    return text
