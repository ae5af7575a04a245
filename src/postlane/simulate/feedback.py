"""What the simulated provider says after the session: the DSNs and complaints of ``stage =
"later"`` rules, composed, delivered to the message's return path, and counted.

A real relay (Postfix, Gmail's front ends) answers 250 at RCPT and finds out later that the
mailbox does not exist, is full, or that its owner pressed "report spam". Then it writes:

DSN (RFC 3464)
    ``multipart/report; report-type=delivery-status``, from ``MAILER-DAEMON`` with the null
    return path, to the message's envelope sender (with postlane's ``[bounces] domain``, its
    VERP return path): a human-readable part, a ``message/delivery-status`` part
    (``Reporting-MTA`` the scenario's hostname; per recipient ``Action: failed`` for a 5xx
    reply or ``delayed`` for a 4xx one, the reply's enhanced code as ``Status``, the reply as
    ``Diagnostic-Code``), and the original's headers as ``text/rfc822-headers``.
ARF complaint (RFC 5965)
    ``multipart/report; report-type=feedback-report`` with ``Feedback-Type: abuse`` and
    ``Original-Rcpt-To``, sent, as feedback loops do, to the original's return path, with the
    original attached as ``message/rfc822`` beginning with its ``Return-Path`` (only its headers,
    as ``text/rfc822-headers``, when it is over :data:`ATTACH_LIMIT`).

:class:`LateReports` delivers them with aiosmtplib to one ``host:port`` (postlane's bounce
listener), each after its rule's delay. A connection that fails or a 4xx reply is tried again
after 1, 2, 4 and 8 seconds (the listener answers 451 to a report about a delivery it has not
yet seen recorded); a 5xx reply is final at once, as it is for any MTA. A report that cannot be
delivered is counted as undelivered, with why, and never stops the simulator. When the
simulator stops, reports still waiting are sent at once, their delays cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from enum import StrEnum
from typing import Any

import aiosmtplib

from postlane.clock import Clock
from postlane.simulate.scenario import show_address

__all__ = ["ATTACH_LIMIT", "Arrival", "LateReport", "LateReports", "ReportType"]

log = logging.getLogger("postlane.simulate")

#: a complaint attaches the whole original up to this size, only its headers above it
ATTACH_LIMIT = 1024 * 1024
#: the waits before the second, third... attempt at delivering a report
RETRY_AFTER = (1.0, 2.0, 4.0, 8.0)
#: seconds for connecting and for each reply (the bounce listener may take 10 s to answer a
#: report about a delivery still being recorded)
TIMEOUT = 30.0
#: reports being delivered at once (the bounce listener takes 10 clients from one address)
CONNECTIONS = 4
#: reports waiting (for their delay or a retry); more are counted undelivered at once
MAX_WAITING = 10_000
#: how long a stopping simulator waits for the reports it is sending
FLUSH_DEADLINE = 10.0
#: undelivered reports listed in the simulator's report
_EXAMPLES = 10
#: a delayed DSN says the relay goes on trying until the message is this old (Postfix's
#: maximal_queue_lifetime)
_RETRY_UNTIL = 5 * 86400.0
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_LINE_ENDINGS = re.compile(rb"\r?\n")


class ReportType(StrEnum):
    """What kind of report is sent."""

    DSN = "dsn"
    ARF = "arf"


@dataclass(frozen=True)
class Arrival:
    """A message the simulator accepted, as its reports quote it."""

    #: the envelope sender (MAIL FROM), where reports go; "" for the null sender
    return_path: str
    content: bytes
    client_ip: str
    #: the name the client gave in EHLO/HELO
    helo: str
    #: when it was accepted (epoch seconds)
    at: float
    #: the id the 250 reply gave it
    queue_id: str


@dataclass(frozen=True)
class LateReport:
    """One report about recipients of an accepted message: a DSN with one reply per
    recipient, or a complaint about one recipient."""

    type: ReportType
    arrival: Arrival
    recipients: tuple[str, ...]
    #: the reply reported for each recipient (DSN only)
    replies: tuple[str, ...] = ()

    @classmethod
    def dsn(cls, arrival: Arrival, recipients: Sequence[str], replies: Sequence[str]) -> LateReport:
        if len(recipients) != len(replies) or not recipients:
            raise ValueError("a DSN has one reply for each of its recipients")
        return cls(ReportType.DSN, arrival, tuple(recipients), tuple(replies))

    @classmethod
    def complaint(cls, arrival: Arrival, recipient: str) -> LateReport:
        return cls(ReportType.ARF, arrival, (recipient,))

    @property
    def return_path(self) -> str:
        return self.arrival.return_path

    def sender(self, hostname: str) -> str:
        """The envelope sender of the report: the null sender for a DSN (RFC 3464 says so, and
        nothing bounces a bounce); a feedback loop's own address for a complaint."""
        return "" if self.type is ReportType.DSN else f"feedback-loop@{hostname}"

    def outcomes(self) -> Counter[str]:
        """What it reports, per recipient: ``failed``, ``delayed`` or ``complained``."""
        if self.type is ReportType.ARF:
            return Counter({"complained": len(self.recipients)})
        return Counter(_action(reply) for reply in self.replies)

    def compose(self, hostname: str, now: float, serial: int) -> bytes:
        """The report as it is sent, written by ``hostname`` at ``now``; ``serial`` makes its
        Message-ID unique."""
        if self.type is ReportType.DSN:
            return compose_dsn(self, hostname, now, serial)
        return compose_arf(self, hostname, now, serial)


def compose_dsn(report: LateReport, hostname: str, now: float, serial: int) -> bytes:
    """An RFC 3464 delivery status notification: ``failed`` for 5xx replies, ``delayed`` for
    4xx ones, with the original's headers."""
    arrival = report.arrival
    actions = [_action(reply) for reply in report.replies]
    failed = "failed" in actions
    boundary = _boundary(arrival, serial, hostname)
    if failed:
        subject = "Undelivered Mail Returned to Sender"
        notice = (
            "I'm sorry to have to inform you that your message could not\r\n"
            "be delivered to one or more recipients. Its headers are attached below."
        )
    else:
        subject = "Delayed Mail (still being retried)"
        notice = (
            "####### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #######\r\n"
            "\r\n"
            "Your message could not be delivered yet to one or more recipients.\r\n"
            f"It will be retried until it is {_RETRY_UNTIL / 86400:.0f} days old."
        )
    explained = "\r\n".join(
        f"<{address}>: {_one_line(reply)}"
        for address, reply in zip(report.recipients, report.replies, strict=True)
    )
    per_message = [
        f"Reporting-MTA: dns; {hostname}",
        f"Received-From-MTA: dns; {arrival.helo or arrival.client_ip}",
        f"Arrival-Date: {_date(arrival.at)}",
    ]
    blocks = []
    for address, reply, action in zip(report.recipients, report.replies, actions, strict=True):
        fields = [
            f"Final-Recipient: rfc822; {address}",
            f"Action: {action}",
            f"Status: {_status(reply)}",
            f"Diagnostic-Code: smtp; {_folded(reply)}",
            f"Last-Attempt-Date: {_date(now)}",
        ]
        if action == "delayed":
            fields.append(f"Will-Retry-Until: {_date(arrival.at + _RETRY_UNTIL)}")
        blocks.append("\r\n".join(fields))
    parts = [
        (
            "Content-Description: Notification\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"This is the mail system at host {hostname}.\r\n\r\n{notice}\r\n\r\n"
            f"{explained}\r\n"
        ).encode(),
        (
            "Content-Description: Delivery report\r\n"
            "Content-Type: message/delivery-status\r\n\r\n"
            + "\r\n".join(per_message)
            + "\r\n\r\n"
            + "\r\n\r\n".join(blocks)
            + "\r\n"
        ).encode(),
        b"Content-Description: Undelivered Message Headers\r\n"
        b"Content-Type: text/rfc822-headers\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + _quoted_headers(arrival),
    ]
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{arrival.return_path}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{serial}.{boundary[:12]}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    return _multipart(head, boundary, parts)


def compose_arf(report: LateReport, hostname: str, now: float, serial: int) -> bytes:
    """An RFC 5965 abuse report about the message, for its one recipient, with the original
    attached (its headers only when it is over :data:`ATTACH_LIMIT`)."""
    arrival = report.arrival
    [recipient] = report.recipients
    boundary = _boundary(arrival, serial, hostname)
    fields = [
        "Feedback-Type: abuse",
        "User-Agent: postlane-simulator/1.0",
        "Version: 1",
        f"Original-Mail-From: <{arrival.return_path}>",
        f"Original-Rcpt-To: <{recipient}>",
        f"Arrival-Date: {_date(arrival.at)}",
        f"Reporting-MTA: dns; {hostname}",
    ]
    if arrival.client_ip:
        fields.append(f"Source-IP: {arrival.client_ip}")
    fields.append(f"Removal-Recipient: {recipient}")
    if len(arrival.content) <= ATTACH_LIMIT:
        original = (
            b"Content-Type: message/rfc822\r\n"
            b"Content-Disposition: inline\r\n\r\n"
            + _received_headers(arrival, hostname)
            + _LINE_ENDINGS.sub(b"\r\n", arrival.content)
        )
    else:
        original = b"Content-Type: text/rfc822-headers\r\n\r\n" + _quoted_headers(arrival, hostname)
    parts = [
        (
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            "This is an email abuse report for a message received from IP "
            f"{arrival.client_ip or 'unknown'} on {_date(arrival.at)}.\r\n"
            f"The recipient, {recipient}, reported it as spam.\r\n"
        ).encode(),
        ("Content-Type: message/feedback-report\r\n\r\n" + "\r\n".join(fields) + "\r\n").encode(),
        original,
    ]
    head = [
        f"From: Feedback Loop <feedback-loop@{hostname}>",
        f"To: <{arrival.return_path}>",
        f"Subject: Abuse report about a message to {recipient}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{serial}.{boundary[:12]}@{hostname}>",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=feedback-report;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    return _multipart(head, boundary, parts)


def _action(reply: str) -> str:
    return "failed" if reply.startswith("5") else "delayed"


def _status(reply: str) -> str:
    """The reply's enhanced code (``550 5.1.1 ...`` -> ``5.1.1``), else ``5.0.0``/``4.0.0``."""
    found = _ENHANCED.match(reply[4:])
    return found.group(0) if found is not None else f"{reply[0]}.0.0"


def _one_line(reply: str) -> str:
    return " ".join(line.strip() for line in reply.splitlines() if line.strip())


def _folded(reply: str) -> str:
    """A multi-line reply as one folded header value (each line continues the last)."""
    return "\r\n    ".join(line.strip() for line in reply.splitlines() if line.strip())


def _date(at: float) -> str:
    return formatdate(at, usegmt=True)


def _boundary(arrival: Arrival, serial: int, hostname: str) -> str:
    # a hash of the quoted message cannot occur in it
    digest = hashlib.sha256(arrival.content[:ATTACH_LIMIT]).hexdigest()[:24]
    return f"{digest}.{serial}/{hostname}"


def _header_block(content: bytes) -> bytes:
    """The original's header block, with CRLF line endings and no blank line at its end."""
    end = len(content)
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = content.find(separator)
        if 0 <= found < end:
            end = found
    return _LINE_ENDINGS.sub(b"\r\n", content[:end]).rstrip(b"\r\n") + b"\r\n"


def _received_headers(arrival: Arrival, hostname: str) -> bytes:
    """What a final delivery puts on top of a message: its return path and a trace line."""
    helo = arrival.helo or "unknown"
    return (
        f"Return-Path: <{arrival.return_path}>\r\n"
        f"Received: from {helo} ([{arrival.client_ip}])\r\n"
        f"\tby {hostname} with ESMTP id {arrival.queue_id};\r\n"
        f"\t{_date(arrival.at)}\r\n"
    ).encode()


def _quoted_headers(arrival: Arrival, hostname: str | None = None) -> bytes:
    headers = _header_block(arrival.content)
    if hostname is not None:
        return _received_headers(arrival, hostname) + headers
    return f"Return-Path: <{arrival.return_path}>\r\n".encode() + headers


def _multipart(head: Sequence[str], boundary: str, parts: Sequence[bytes]) -> bytes:
    out = ["\r\n".join(head).encode() + b"\r\n\r\nThis is a MIME-encapsulated message.\r\n"]
    for part in parts:
        out.append(f"\r\n--{boundary}\r\n".encode() + part)
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out)


class _Undelivered(Exception):
    """One attempt at delivering a report failed; ``final``: trying again will not help."""

    def __init__(self, reason: str, *, final: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final


class LateReports:
    """Reports waiting for their delay, being delivered, and what became of them.

    :meth:`schedule` never blocks and never raises: a report is a task of its own, bounded
    in number (:data:`MAX_WAITING`) and in connections (:data:`CONNECTIONS`)."""

    def __init__(self, destination: tuple[str, int], hostname: str, clock: Clock) -> None:
        self.destination = destination
        self.hostname = hostname
        self.clock = clock
        self.sent: Counter[str] = Counter({kind.value: 0 for kind in ReportType})
        self.undelivered: Counter[str] = Counter({kind.value: 0 for kind in ReportType})
        self.reported: Counter[str] = Counter({"failed": 0, "delayed": 0, "complained": 0})
        self.retries = 0
        self.without_return_path = 0
        self.examples: list[dict[str, Any]] = []
        self._serial = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = asyncio.Semaphore(CONNECTIONS)
        self._flushing = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        """Reports not yet delivered nor given up."""
        return len(self._tasks)

    def schedule(self, report: LateReport, delay: float) -> None:
        """Deliver ``report`` in ``delay`` seconds (at once when the simulator is stopping)."""
        if not report.return_path:
            # the null sender: nothing may be sent back (RFC 5321 4.5.5)
            self.without_return_path += 1
            return
        if len(self._tasks) >= MAX_WAITING:
            self._give_up(report, f"more than {MAX_WAITING} reports were waiting")
            return
        task = asyncio.get_running_loop().create_task(self._deliver_later(report, delay))
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    async def wait(self) -> None:
        """Until every report scheduled so far is delivered or given up."""
        await self._idle.wait()

    async def close(self, deadline: float = FLUSH_DEADLINE) -> None:
        """Send what is waiting at once; after ``deadline`` seconds, give up on the rest."""
        self._flushing.set()
        tasks = set(self._tasks)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def report(self) -> dict[str, Any]:
        """The ``reports`` part of the simulator's report (see ``docs/simulator.md``)."""
        return {
            "to": show_address(self.destination),
            "sent": dict(self.sent),
            "undelivered": dict(self.undelivered),
            "waiting": self.waiting,
            "recipients": dict(self.reported),
            "retries": self.retries,
            "without_return_path": self.without_return_path,
            "first_undelivered": list(self.examples),
        }

    # -- delivering

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _deliver_later(self, report: LateReport, delay: float) -> None:
        attempts = 0
        try:
            await self._pause(delay)
            for retry_after in (*RETRY_AFTER, None):
                attempts += 1
                try:
                    async with self._connections:
                        await self._deliver(report)
                except _Undelivered as exc:
                    if exc.final or retry_after is None:
                        self._give_up(report, exc.reason, attempts)
                        return
                    self.retries += 1
                    await self._pause(retry_after)
                else:
                    self.sent[report.type.value] += 1
                    self.reported.update(report.outcomes())
                    return
        except asyncio.CancelledError:
            self._give_up(report, "the simulator stopped before it could be delivered", attempts)
            raise
        except Exception as exc:  # a bug must not stop the simulator: the report is lost
            log.exception("postlane simulate: a report could not be composed or sent")
            self._give_up(report, f"{type(exc).__name__}: {exc}", attempts)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` of the clock's time, or until the simulator stops."""
        if seconds <= 0 or self._flushing.is_set():
            return
        sleeping = asyncio.ensure_future(self.clock.sleep(seconds))
        stopping = asyncio.ensure_future(self._flushing.wait())
        try:
            await asyncio.wait((sleeping, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            stopping.cancel()
            await asyncio.gather(sleeping, stopping, return_exceptions=True)

    async def _deliver(self, report: LateReport) -> None:
        """One attempt over a new connection; :class:`_Undelivered` says why it failed."""
        self._serial += 1
        content = report.compose(self.hostname, self.clock.now(), self._serial)
        host, port = self.destination
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=self.hostname,
            timeout=TIMEOUT,
            start_tls=False,
        )
        try:
            await client.connect()
            await client.ehlo()
            options = []
            if not content.isascii() and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            await client.sendmail(
                report.sender(self.hostname), [report.return_path], content, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            [refused] = exc.recipients
            reason = _said(refused.code, refused.message)
            raise _Undelivered(reason, final=refused.code >= 500) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _Undelivered(_said(exc.code, exc.message), final=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _Undelivered(str(exc) or type(exc).__name__) from None
        finally:
            if client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.quit()
                client.close()

    def _give_up(self, report: LateReport, reason: str, attempts: int = 0) -> None:
        self.undelivered[report.type.value] += 1
        log.warning(
            "postlane simulate: gave up on the %s to <%s> about %s (%s at %s): %s",
            report.type.value.upper(),
            report.return_path,
            ", ".join(report.recipients),
            f"{attempts} attempt{'s' if attempts != 1 else ''}",
            show_address(self.destination),
            reason,
        )
        if len(self.examples) < _EXAMPLES:
            self.examples.append(
                {
                    "type": report.type.value,
                    "return_path": report.return_path,
                    "recipients": list(report.recipients),
                    "attempts": attempts,
                    "reason": reason,
                }
            )


def _said(code: int, message: str) -> str:
    return f"{code} {_one_line(message)}"
