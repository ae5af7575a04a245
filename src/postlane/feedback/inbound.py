"""What arrives at the bounce domain becomes feedback on one delivery, or is kept for the
operator: :class:`BounceProcessor` reads a received message (:mod:`postlane.feedback.reports`),
matches each recipient it names to a delivery, classifies its diagnostic with the same
:func:`postlane.classify.classify` a synchronous reply goes through, and records the result
through :meth:`postlane.store.base.FeedbackStore.record_feedback` (state, history, event and
suppression in one transaction).

Matching
    1. The VERP token of a RCPT TO address (``b-<token>@bounce-domain``, checked against its
       HMAC: a forged one names nothing). With no such RCPT (a feedback loop's fixed address),
       valid return paths quoted inside the report (the original's ``Return-Path``, a DSN's
       ``X-Postfix-Sender``, a complaint's ``Original-Mail-From``) are used the same way.
       A report naming one recipient is matched to the one delivery a token names even when
       the addresses differ (forwarding rewrote it); a report naming several matches a
       token's delivery by address only (a list's expansion never bounces the list). What a
       report with a token says about other recipients is ignored (kept for review): a
       recipient's own token must not let it report on the others of its message.
    2. Else (no token anywhere), only with ``match_message_id`` (``[bounces]
       match_message_id``, off by default): the original's ``Message-ID`` (from its returned
       headers) and the recipient's address, for a message sent to that address alone:
       ``store.sole_deliveries(address, message_id)``. A Message-ID is no proof: postlane
       hands its own (``<queue id@sender domain>``) back to every submitter, and
       applications' are often predictable, so anyone who may send one message could
       otherwise forge a report bouncing (and suppressing, for every sender) its recipient.
       With the setting off, a report this would have matched is kept for review, its note
       naming the delivery. The Message-ID and the ``To`` header are what every recipient
       of a message sees, so for a message with several recipients they are never used: one
       of them could otherwise bounce or complain for another.

Classification and recording (``classify()`` on the diagnostic, with the DSN's ``Status``
put in when the text has none; see :meth:`RecipientStatus.reply`)
    ========================= =================== =================================================
    report                    class               recorded as
    ========================= =================== =================================================
    Action ``failed``         ``hard_bounce``     BOUNCED + suppression (``*``, ``hard_bounce``)
    Action ``failed``         any other class     BOUNCED, no suppression: the relay gave up, so
                                                  the recipient never got it (a policy block,
                                                  a message error, or days of 4xx replies); the
                                                  recipient is not to blame
    Action ``delayed``        ``soft_bounce``     SOFT_BOUNCE (counted; no state change)
    Action ``delayed``        any other class     DELAYED (an event; no state change)
    ``delivered``/``relayed``/``expanded``        DELIVERED (history only)
    ARF abuse/fraud/virus/other                   COMPLAINED + suppression (the sender's domain,
                                                  or ``*`` with ``ComplaintScope.GLOBAL``)
    ========================= =================== =================================================

Kept unmatched (``store.record_unmatched``), never an exception, never silently dropped:
automatic replies (kind ``auto-reply``), messages that are no report, unreadable ones, ARF
reports that are no complaint, recipients nothing matches (or only a Message-ID, with
``match_message_id`` off), and reports about a recipient that was never sent
(``record_feedback`` would change nothing). A repeat of a bounce or complaint already recorded
changes nothing and is counted as a duplicate. A report about a delivery still being sent (the
bounce can beat the worker's own record of ``sent``) is waited for a few seconds, then left
``pending``: the listener answers 451 and the bouncing MTA tries again.

A complaint storm (thousands of reports at once) is written in batches: concurrent reports
share one ``record_feedback`` transaction (:class:`FeedbackBatcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from postlane.classify import ReplyClass, Verdict, classify
from postlane.clock import Clock, SystemClock
from postlane.errors import StoreUnavailable
from postlane.feedback import DeliveryRef, Feedback, FeedbackKind, FeedbackResult, Report
from postlane.feedback.reports import (
    PARSE_LIMIT,
    Action,
    ParsedReport,
    RecipientStatus,
    ReportKind,
    parse_report,
)
from postlane.feedback.verp import ReturnPaths
from postlane.message import RecipientState
from postlane.store.base import FeedbackStore

if TYPE_CHECKING:
    from postlane.config import BouncesConfig

__all__ = [
    "BounceProcessor",
    "ComplaintScope",
    "Disposition",
    "FeedbackBatcher",
    "InboundResult",
    "feedback_for",
]

log = logging.getLogger("postlane.bounces")

#: what a report about a recipient in these states may apply to (it was handed on)
_SENT_STATES = frozenset({RecipientState.SENT, RecipientState.BOUNCED, RecipientState.COMPLAINED})
#: reports larger than this are parsed in a worker thread, off the event loop
_THREAD_PARSE = 64 * 1024
#: the longest reason kept with an unmatched report
_REASON_LIMIT = 1000
#: where each kind of report is said to come from (``Feedback.source``, the history's relay)
_SOURCES = {ReportKind.DSN: "dsn", ReportKind.ARF: "arf", ReportKind.PLAIN: "plain-bounce"}


class ComplaintScope(StrEnum):
    """Where a complaint suppresses its recipient."""

    #: mail from the complained-about message's sender domain only (the default: a complaint
    #: about a newsletter need not stop another brand's password resets)
    SENDER_DOMAIN = "sender-domain"
    #: mail from every sender
    GLOBAL = "global"

    def complaint_suppression(self, ref: DeliveryRef) -> tuple[str, str, None]:
        """The suppression a complaint about ``ref`` adds: its scope, reason and expiry."""
        domain = ref.sender.rpartition("@")[2].lower()
        scope = "*" if self is ComplaintScope.GLOBAL or not domain else domain
        return (scope, "complaint", None)


class Disposition(StrEnum):
    """What became of one received message (a metric label)."""

    #: feedback was recorded for at least one delivery
    RECORDED = "recorded"
    #: it matched, but repeats what was already recorded
    DUPLICATE = "duplicate"
    #: kept for the operator (including automatic replies)
    UNMATCHED = "unmatched"
    #: about a delivery still being sent: to be tried again later (SMTP 451)
    PENDING = "pending"


@dataclass(frozen=True)
class InboundResult:
    """The outcome of :meth:`BounceProcessor.process`."""

    kind: ReportKind
    #: the feedback that was applied (each changed its delivery or added to its history)
    recorded: tuple[Feedback, ...] = ()
    duplicates: int = 0
    #: the unmatched record kept, and why (None when everything matched)
    unmatched_id: int | None = None
    reason: str | None = None
    #: deliveries still being sent; nothing about them was recorded
    pending: tuple[int, ...] = ()

    @property
    def disposition(self) -> Disposition:
        if self.pending:
            return Disposition.PENDING
        if self.recorded:
            return Disposition.RECORDED
        if self.unmatched_id is not None:
            return Disposition.UNMATCHED
        return Disposition.DUPLICATE

    def summary(self) -> str:
        """A few words for a log line or an SMTP reply: ``1 bounced``, ``kept: ...``."""
        counts: dict[str, int] = {}
        for item in self.recorded:
            counts[item.kind.value] = counts.get(item.kind.value, 0) + 1
        words = [f"{n} {kind}" for kind, n in counts.items()]
        if self.duplicates:
            words.append(f"{self.duplicates} already recorded")
        if self.unmatched_id is not None:
            words.append(f"kept for review as #{self.unmatched_id}")
        if self.pending:
            words.append(f"{len(self.pending)} still being sent")
        return ", ".join(words) or "nothing to record"


def feedback_for(
    status: RecipientStatus, ref: DeliveryRef, *, source: str, at: float
) -> tuple[Feedback, Verdict]:
    """The feedback a report's recipient status gives about the delivery ``ref`` (see the
    table in the module docstring), and the verdict it was decided by."""
    reply = status.reply()
    verdict = classify(reply)
    if status.action is Action.FAILED and verdict.cls is ReplyClass.DELIVERED:
        # a failure reported with the last 2xx the relay saw: the failure is what counts
        reply = replace(status, diagnostic=None).reply() + f" ({status.diagnostic})"
        verdict = classify(reply)
    suppression = None
    if status.action is Action.FAILED:
        kind = FeedbackKind.BOUNCED
        if verdict.cls is ReplyClass.HARD_BOUNCE:
            suppression = ("*", "hard_bounce", None)
    elif status.action is Action.DELAYED:
        if verdict.cls is ReplyClass.DELIVERED:
            verdict = replace(verdict, cls=ReplyClass.TEMPORARY)
        is_soft = verdict.cls is ReplyClass.SOFT_BOUNCE
        kind = FeedbackKind.SOFT_BOUNCE if is_soft else FeedbackKind.DELAYED
    else:
        kind = FeedbackKind.DELIVERED
        verdict = replace(verdict, cls=ReplyClass.DELIVERED)
    item = Feedback(
        kind,
        ref.delivery_id,
        at,
        source,
        verdict.cls,
        verdict.code,
        verdict.enhanced,
        reply,
        suppression=suppression,
    )
    return item, verdict


@dataclass
class _Pending:
    items: Sequence[Feedback]
    done: asyncio.Future[list[FeedbackResult]]


class FeedbackBatcher:
    """Concurrent :meth:`record` calls share one ``record_feedback`` transaction (up to
    ``max_items`` items), as the worker's recorder batches delivery outcomes: a storm of
    thousands of complaints costs tens of commits, not thousands."""

    def __init__(self, store: FeedbackStore, clock: Clock, *, max_items: int = 500) -> None:
        self.store = store
        self.clock = clock
        self.max_items = max_items
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        #: transactions written (tests and the benchmark check the batching)
        self.transactions = 0

    async def record(self, items: Sequence[Feedback]) -> list[FeedbackResult]:
        """Record ``items`` (in a batch with whatever else is waiting); returns their results
        once committed. Raises what the store raised."""
        if not items:
            return []
        pending = _Pending(items, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="postlane-feedback-writer")
        return await pending.done

    async def _write(self) -> None:
        while self._queue:
            await asyncio.sleep(0)  # let the reports arriving together join this batch
            batch: list[_Pending] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0].items) <= self.max_items):
                taken = self._queue.pop(0)
                batch.append(taken)
                size += len(taken.items)
            items = [item for pending in batch for item in pending.items]
            try:
                results = await self.store.record_feedback(items, self.clock.now())
                self.transactions += 1
            except Exception as exc:
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            offset = 0
            for pending in batch:
                mine = results[offset : offset + len(pending.items)]
                offset += len(pending.items)
                if not pending.done.done():
                    pending.done.set_result(mine)

    async def close(self) -> None:
        """Wait for what is being written."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer


@dataclass
class _Match:
    status: RecipientStatus | None  # None: the complaint of an ARF report
    ref: DeliveryRef


class BounceProcessor:
    """Turns received messages into recorded feedback (see the module docstring).

    ``store`` needs only the feedback role; ``return_paths`` holds the bounce domain and the
    VERP key (``await store.secret("verp", now)``). ``in_flight_wait`` bounds how long a
    report about a delivery still being sent waits for the worker's record before it is
    answered "try again later". ``match_message_id`` applies a report without a VERP token
    that a Message-ID matches (Matching, step 2): only where every submitter is trusted."""

    def __init__(
        self,
        store: FeedbackStore,
        return_paths: ReturnPaths,
        *,
        clock: Clock | None = None,
        complaint_scope: ComplaintScope = ComplaintScope.SENDER_DOMAIN,
        source: str = "bounce listener",
        in_flight_wait: float = 10.0,
        poll_interval: float = 0.2,
        batcher: FeedbackBatcher | None = None,
        match_message_id: bool = False,
    ) -> None:
        self.store = store
        self.return_paths = return_paths
        self.clock = clock or SystemClock()
        self.complaint_scope = ComplaintScope(complaint_scope)
        self.source = source
        self.in_flight_wait = in_flight_wait
        self.poll_interval = poll_interval
        self.batcher = batcher or FeedbackBatcher(store, self.clock)
        self.match_message_id = match_message_id

    @classmethod
    def from_config(
        cls,
        bounces: BouncesConfig,
        store: FeedbackStore,
        verp_key: bytes,
        *,
        clock: Clock | None = None,
        **options: Any,
    ) -> BounceProcessor:
        """The processor ``[bounces]`` describes (its domain, complaint scope and Message-ID
        matching); ``options`` as the constructor's (``match_message_id`` overrides)."""
        assert bounces.domain is not None, "[bounces] domain names where reports come back"
        settings: dict[str, Any] = {
            "complaint_scope": ComplaintScope(bounces.complaint_scope),
            "match_message_id": bounces.match_message_id,
            **options,
        }
        return cls(store, ReturnPaths(bounces.domain, verp_key), clock=clock, **settings)

    async def process(
        self, content: bytes, *, mail_from: str | None = None, rcpt_to: Sequence[str] = ()
    ) -> InboundResult:
        """Read, match, classify and record one received message; returns what became of it.
        Raises only what the store raises (the caller answers "try again later"): anything
        else that goes wrong keeps the message unmatched, saying what, so a report that trips
        a bug is neither lost nor retried by its sender forever."""
        if len(content) > _THREAD_PARSE:
            parsed = await asyncio.to_thread(parse_report, content)
        else:
            parsed = parse_report(content)
        report = Report(
            self.source, parsed.kind.value, content, mail_from, ", ".join(rcpt_to) or None
        )
        try:
            return await self._process(parsed, report, rcpt_to)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.exception("a %s could not be processed; keeping it for review", parsed.kind)
            return await self._keep(
                parsed, report, [f"could not be processed: {type(exc).__name__}: {exc}"]
            )

    async def _process(
        self, parsed: ParsedReport, report: Report, rcpt_to: Sequence[str]
    ) -> InboundResult:
        reason = _not_feedback(parsed)
        if reason is not None:
            return await self._keep(parsed, report, [reason])
        matches, notes = await self._match(parsed, report.content, rcpt_to)
        matches, notes, pending = await self._sent_only(matches, notes)
        source = _SOURCES[parsed.kind]
        now = self.clock.now()
        items = [self._feedback(parsed, match, source, now) for match in matches]
        results = await self.batcher.record(items)
        recorded: list[Feedback] = []
        duplicates = 0
        for item, applied in zip(items, results, strict=True):
            if applied.changed:
                recorded.append(item)
            elif applied.duplicate:
                duplicates += 1
            elif applied.state is None:
                notes.append(f"delivery {item.delivery_id} no longer exists")
            else:
                notes.append(f"delivery {item.delivery_id} is {applied.state}: it was not sent")
        kept = await self._keep(parsed, report, notes) if notes else None
        result = InboundResult(
            parsed.kind,
            recorded=tuple(recorded),
            duplicates=duplicates,
            unmatched_id=kept.unmatched_id if kept else None,
            reason=kept.reason if kept else None,
            pending=tuple(pending),
        )
        log.info("%s from %s: %s", parsed.kind, report.mail_from or "<>", result.summary())
        return result

    async def close(self) -> None:
        await self.batcher.close()

    # -- matching ---------------------------------------------------------------------------------

    async def _match(
        self, parsed: ParsedReport, content: bytes, rcpt_to: Sequence[str]
    ) -> tuple[list[_Match], list[str]]:
        ids = [i for a in rcpt_to if (i := self.return_paths.delivery_id(a)) is not None]
        if not ids:  # a fixed report address: the original's return path names the delivery
            text = content[:PARSE_LIMIT].decode("latin-1")
            ids = list(self.return_paths.find(text))
        by_token = await self.store.delivery_refs(list(dict.fromkeys(ids))) if ids else []
        if parsed.kind is ReportKind.ARF:
            return await self._match_complaint(parsed, by_token, had_token=bool(ids))
        statuses = parsed.recipients
        if not statuses:
            return [], ["the report names no recipient"]
        matches: list[_Match] = []
        notes: list[str] = []
        for status in statuses:
            refs = [r for r in by_token if r.address.lower() in status.addresses]
            if not refs and len(by_token) == 1 and len(statuses) == 1:
                refs = by_token  # the one recipient the token names, whatever it is called now
            unproven: str | None = None
            if not refs and not ids and parsed.message_id:
                refs, unproven = await self._by_message_id(status.addresses, parsed.message_id)
            if refs:
                matches.extend(_Match(status, ref) for ref in refs)
            else:
                notes.append(
                    unproven or _unmatched_note(status.addresses, parsed.message_id, bool(ids))
                )
        return _unique(matches), notes

    async def _match_complaint(
        self, parsed: ParsedReport, by_token: Sequence[DeliveryRef], *, had_token: bool
    ) -> tuple[list[_Match], list[str]]:
        assert parsed.complaint is not None
        recipients = parsed.complaint.recipients
        refs = [r for r in by_token if r.address.lower() in recipients]
        if not refs and len(by_token) == 1:
            refs = list(by_token)  # feedback loops redact the recipient: the token is enough
        unproven: str | None = None
        if not refs and not had_token and parsed.message_id:
            refs, unproven = await self._by_message_id(recipients, parsed.message_id)
        if not refs:
            return [], [unproven or _unmatched_note(recipients, parsed.message_id, had_token)]
        return _unique([_Match(None, ref) for ref in refs]), []

    async def _by_message_id(
        self, addresses: Sequence[str], message_id: str
    ) -> tuple[list[DeliveryRef], str | None]:
        """The delivery to one of ``addresses`` of a message with ``message_id`` sent to that
        address alone (see the module docstring: Matching). With ``match_message_id`` off,
        no delivery but a note naming the one found: a Message-ID is no proof, so the
        operator judges."""
        for address in addresses:
            found = await self.store.sole_deliveries(address, message_id)
            if found and self.match_message_id:
                return found, None
            if found:
                return [], _unproven_note(address, found, message_id)
        return [], None

    async def _sent_only(
        self, matches: list[_Match], notes: list[str]
    ) -> tuple[list[_Match], list[str], list[int]]:
        """The matches whose delivery was sent; a delivery still being sent is waited for
        (the relay's bounce can beat the worker's own record of ``sent``)."""
        deadline = time.monotonic() + self.in_flight_wait
        while True:
            sending = [m for m in matches if m.ref.state is RecipientState.SENDING]
            if not sending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(self.poll_interval)
            fresh = {
                r.delivery_id: r
                for r in await self.store.delivery_refs([m.ref.delivery_id for m in sending])
            }
            for match in sending:
                if match.ref.delivery_id in fresh:
                    match.ref = fresh[match.ref.delivery_id]
        kept: list[_Match] = []
        pending: list[int] = []
        for match in matches:
            state = match.ref.state
            if state is RecipientState.SENDING:
                pending.append(match.ref.delivery_id)
            elif state in _SENT_STATES:
                kept.append(match)
            else:
                notes.append(
                    f"{match.ref.address} (delivery {match.ref.delivery_id}) is {state}: "
                    "it was never sent, so the report cannot apply"
                )
        return kept, notes, pending

    # -- recording --------------------------------------------------------------------------------

    def _feedback(self, parsed: ParsedReport, match: _Match, source: str, now: float) -> Feedback:
        # a report sent again (its sender's retry after a lost answer) is a repeat by its own
        # Message-ID: a delay heard twice is one deferred event
        key = f"{source}:{parsed.report_id}" if parsed.report_id else None
        if match.status is not None:
            item = replace(feedback_for(match.status, match.ref, source=source, at=now)[0], key=key)
            final = match.status.recipient
            if item.kind is FeedbackKind.BOUNCED and final not in (None, match.ref.address.lower()):
                # another final recipient failed (a list's member, an alias's or a forward's
                # target): no proof that the address postlane sent to is bad
                text = f"{item.text} (for {final}, reached through {match.ref.address})"
                item = replace(item, suppression=None, text=text)
            return item
        assert parsed.complaint is not None
        return Feedback(
            FeedbackKind.COMPLAINED,
            match.ref.delivery_id,
            now,
            source,
            text=parsed.complaint.describe(),
            suppression=self.complaint_scope.complaint_suppression(match.ref),
            key=key,
        )

    async def _keep(self, parsed: ParsedReport, report: Report, notes: list[str]) -> InboundResult:
        reason = "; ".join(notes)[:_REASON_LIMIT]
        unmatched_id = await self.store.record_unmatched(report, reason, self.clock.now())
        log.info("%s kept for review as #%d: %s", parsed.kind, unmatched_id, reason)
        return InboundResult(parsed.kind, unmatched_id=unmatched_id, reason=reason)


def _not_feedback(parsed: ParsedReport) -> str | None:
    """Why a report gives no feedback at all (None: it may)."""
    if parsed.kind is ReportKind.AUTO_REPLY:
        return f"an automatic reply ({parsed.note}), not a bounce"
    if parsed.kind is ReportKind.UNKNOWN:
        return "neither a DSN, a complaint nor a bounce postlane can read"
    if parsed.kind is ReportKind.UNREADABLE:
        return parsed.note
    if parsed.complaint is not None and not parsed.complaint.is_complaint:
        what = parsed.complaint.feedback_type or "untyped"
        return f"a {what} feedback report, not a complaint"
    return None


def _unmatched_note(addresses: Sequence[str], message_id: str | None, had_token: bool) -> str:
    who = ", ".join(addresses) or "an unnamed recipient"
    by = f"Message-ID {message_id}" if message_id else "no Message-ID"
    token = (
        "its token names another recipient"
        if had_token
        else "no valid VERP token, and a Message-ID names only a message sent to that address alone"
    )
    return f"no delivery matches {who} ({by}; {token})"


def _unproven_note(address: str, found: Sequence[DeliveryRef], message_id: str) -> str:
    deliveries = ", ".join(str(ref.delivery_id) for ref in found)
    which = f"delivery {deliveries}" if len(found) == 1 else f"deliveries {deliveries}"
    return (
        f"{address} matches {which} of {message_id} by Message-ID only, without a VERP "
        "token: not applied ([bounces] match_message_id is off)"
    )


def _unique(matches: list[_Match]) -> list[_Match]:
    """One match per delivery (a report may name a recipient twice)."""
    seen: set[int] = set()
    out = []
    for match in matches:
        if match.ref.delivery_id not in seen:
            seen.add(match.ref.delivery_id)
            out.append(match)
    return out
