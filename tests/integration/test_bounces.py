"""Hearing back after the first hop: VERP return paths on real SMTP transactions, the processor
that turns reports into feedback (on both stores), and the bounce listener over real SMTP.

Samples come from tests/data/feedback (their sources are in its README); their placeholder
return path, recipients and Message-IDs are replaced with those of messages this test stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import smtplib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.errors import StoreUnavailable
from postlane.feedback import FeedbackKind
from postlane.feedback.inbound import BounceProcessor, ComplaintScope, Disposition
from postlane.feedback.reports import ReportKind
from postlane.feedback.verp import ReturnPaths, VerpTransport
from postlane.ingest.bounces import (
    MAIL_FIRST_SHARE,
    BounceListenerSettings,
    start_bounce_listener,
)
from postlane.message import Lane, Message, PreparedMessage, RecipientState, prepare
from postlane.records import AttemptRecord, Outcome
from postlane.store.sqlite import SQLiteStore
from postlane.transports.base import BaseTransport, Envelope, Response
from postlane.waits import MailFirst
from tests.conftest import SMTPPeer, free_port, serve_in_process
from tests.integration.test_store_contract import read_events

DATA = Path(__file__).parent.parent / "data" / "feedback"
T0 = 1_800_000_000.0
DOMAIN = "bounce.example"
PLACEHOLDER = b"b-7-abcdefghijklmnop@bounce.example"
ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


def sample(name: str, **replace: str) -> bytes:
    """A sample as it arrives over SMTP (CRLF), with ``old=new`` texts replaced; a key
    ``return_path`` replaces the placeholder return path."""
    content = (DATA / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return_path = replace.pop("return_path", None)
    if return_path is not None:
        content = content.replace(PLACEHOLDER, return_path.encode())
    for old, new in replace.items():
        content = content.replace(old.encode(), new.encode())
    return content


@dataclass
class Sent:
    """A message stored and sent: its recipients' delivery ids by address."""

    prepared: PreparedMessage
    ids: dict[str, int]

    @property
    def message_id(self) -> str:
        return self.prepared.message_id


class World:
    """A store with sent messages, the VERP addresses of its deliveries and a processor."""

    def __init__(self, store: Any, paths: ReturnPaths, clock: FakeClock) -> None:
        self.store = store
        self.paths = paths
        self.clock = clock
        self.processor = BounceProcessor(store, paths, clock=clock, in_flight_wait=0.5)

    async def send(self, *to: str, sender: str = "app@shop.example", sent: bool = True) -> Sent:
        prepared = prepare(
            Message(sender=sender, to=list(to), subject="Your order", text="It shipped."),
            max_size=10_000_000,
        )
        await self.store.enqueue([prepared], T0)
        refs = {a: (await self.store.find_deliveries(a, queue_id=prepared.id))[0] for a in to}
        ids = {a: ref.delivery_id for a, ref in refs.items()}
        if sent:
            await self.mark_sent(ids.values())
        return Sent(prepared, ids)

    async def claim(self, owner: str = "w1") -> list[Any]:
        """Lease everything due, as a worker about to send does."""
        return list(
            await self.store.claim_due(owner, ALL_LANES, limit=10_000, now=T0, lease_until=T0 + 600)
        )

    async def mark_sent(
        self, delivery_ids: Any, owner: str = "w1", claimed: list[Any] | None = None
    ) -> None:
        """Record the deliveries ``delivery_ids`` sent (the others of the claim stay queued)."""
        wanted = set(delivery_ids)
        if claimed is None:
            claimed = await self.claim(owner)
        outcomes = []
        for message in claimed:
            for delivery in message.deliveries:
                state = RecipientState.SENT if delivery.id in wanted else RecipientState.QUEUED
                attempt = AttemptRecord(
                    T0 + 1, ReplyClass.DELIVERED, 250, "2.0.0", "250 ok", "smtp://relay:25",
                    delivery.address.rpartition("@")[2], 5,
                )  # fmt: skip
                outcomes.append(Outcome(delivery.id, state, 1, 0, T0, attempt))
        await self.store.record(owner, outcomes, T0 + 1)

    def verp(self, sent: Sent, address: str) -> str:
        return self.paths.address(sent.ids[address])

    async def state(self, sent: Sent, address: str) -> RecipientState:
        [ref] = await self.store.delivery_refs([sent.ids[address]])
        return ref.state

    async def suppressions(self) -> set[tuple[str, str, str]]:
        listed = await self.store.list_suppressions(limit=1000)
        return {(s.address, s.scope, s.reason) for s in listed}


@pytest.fixture
async def world(store: Any) -> World:
    key = await store.secret("verp", T0)
    return World(store, ReturnPaths(DOMAIN, key), FakeClock(T0 + 100))


@pytest.fixture
async def sqlite_world(tmp_path: Path) -> AsyncIterator[World]:
    store = SQLiteStore(tmp_path / "bounces.db")
    await store.open()
    key = await store.secret("verp", T0)
    yield World(store, ReturnPaths(DOMAIN, key), FakeClock(T0 + 100))
    await store.close()


# -- the processor, on both stores --------------------------------------------------------------


async def test_a_hard_bounce_bounces_and_suppresses_only_the_recipient_it_names(
    world: World,
) -> None:
    sent = await world.send("nobody@example.net", "ada@example.net")
    dsn = sample("postfix-failed.eml", return_path=world.verp(sent, "nobody@example.net"))
    result = await world.processor.process(
        dsn, mail_from="", rcpt_to=[world.verp(sent, "nobody@example.net")]
    )
    assert result.disposition is Disposition.RECORDED
    [item] = result.recorded
    assert (item.kind, item.cls, item.code, item.enhanced) == (
        FeedbackKind.BOUNCED, ReplyClass.HARD_BOUNCE, 550, "5.1.1",
    )  # fmt: skip
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED
    assert await world.state(sent, "ada@example.net") is RecipientState.SENT
    assert await world.suppressions() == {("nobody@example.net", "*", "hard_bounce")}
    view = await world.store.get_message(sent.prepared.id, history=True)
    [nobody] = [r for r in view.recipients if r.address == "nobody@example.net"]
    assert nobody.last_response is not None
    assert "User unknown in local recipient table" in nobody.last_response.text
    assert [h.relay for h in nobody.history or ()] == ["smtp://relay:25", "dsn"]
    events = [e.type for e in await world.store.events_after(None, limit=100)]
    assert events.count("bounced") == 1


async def test_a_repeated_bounce_changes_nothing_and_is_counted_as_a_duplicate(
    world: World,
) -> None:
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    dsn = sample("postfix-failed.eml", return_path=verp)
    await world.processor.process(dsn, mail_from="", rcpt_to=[verp])
    again = await world.processor.process(dsn, mail_from="", rcpt_to=[verp])
    assert (again.disposition, again.duplicates, again.unmatched_id) == (
        Disposition.DUPLICATE, 1, None,
    )  # fmt: skip
    assert await world.store.list_unmatched(limit=10) == []


async def test_a_delayed_mailbox_full_report_is_a_soft_bounce_that_changes_no_state(
    world: World,
) -> None:
    sent = await world.send("slow@example.net")
    verp = world.verp(sent, "slow@example.net")
    result = await world.processor.process(
        sample("postfix-delayed.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    [item] = result.recorded
    assert (item.kind, item.cls, item.suppression) == (
        FeedbackKind.SOFT_BOUNCE, ReplyClass.SOFT_BOUNCE, None,
    )  # fmt: skip
    assert await world.state(sent, "slow@example.net") is RecipientState.SENT
    assert await world.suppressions() == set()
    [event] = [e for e in await world.store.events_after(None, limit=100) if e.type == "deferred"]
    assert event.cls == "soft_bounce"


async def test_a_delay_report_sent_again_is_a_repeat_by_its_message_id(world: World) -> None:
    """A relay sends its delay DSN again (its retry after our answer was lost): one deferred
    event and one history entry, the second counted as a duplicate, not kept for review. The
    relay's next delay report (a Message-ID of its own) is news."""
    sent = await world.send("slow@example.net")
    verp = world.verp(sent, "slow@example.net")
    delayed = sample("postfix-delayed.eml", return_path=verp)
    first = await world.processor.process(delayed, mail_from="", rcpt_to=[verp])
    again = await world.processor.process(delayed, mail_from="", rcpt_to=[verp])
    assert first.disposition is Disposition.RECORDED
    assert (again.disposition, again.duplicates, again.unmatched_id) == (
        Disposition.DUPLICATE, 1, None,
    )  # fmt: skip
    message_id = re.search(rb"^Message-Id: (<[^>]+>)", delayed, re.MULTILINE | re.IGNORECASE)
    assert message_id is not None
    later = delayed.replace(message_id[1], b"<the-next-delay-report@relay.example>")
    assert (await world.processor.process(later, mail_from="", rcpt_to=[verp])).recorded
    marker = await world.send("later@example.net", sent=False)
    events = await read_events(
        world.store, lambda es: any(e.queue_id == marker.prepared.id for e in es)
    )
    assert [e.type for e in events if e.queue_id == sent.prepared.id].count("deferred") == 2
    view = await world.store.get_message(sent.prepared.id, history=True)
    assert [h.relay for h in view.recipients[0].history or ()].count("dsn") == 2


async def test_a_delay_report_heard_after_the_bounce_is_history_not_a_deferred_event(
    world: World,
) -> None:
    """An outside audit: a relay's delay DSN that arrives after its failure DSN (reports come
    out of order) told the application, in a ``deferred`` event, that the recipient was still
    being tried after its ``bounced`` event. The delay goes into the history only."""
    sent = await world.send("slow@example.net")
    verp = world.verp(sent, "slow@example.net")
    failed = sample("postfix-failed.eml", return_path=verp, **{"nobody@": "slow@"})
    await world.processor.process(failed, mail_from="", rcpt_to=[verp])
    assert await world.state(sent, "slow@example.net") is RecipientState.BOUNCED
    late = await world.processor.process(
        sample("postfix-delayed.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert late.disposition is Disposition.RECORDED
    assert await world.state(sent, "slow@example.net") is RecipientState.BOUNCED
    view = await world.store.get_message(sent.prepared.id, history=True)
    [slow] = view.recipients
    # PostgreSQL shows events once older transactions end (another test's may run): once a
    # message enqueued after the late report shows, whatever the report wrote shows too
    marker = await world.send("later@example.net", sent=False)
    events = await read_events(
        world.store, lambda es: any(e.queue_id == marker.prepared.id for e in es)
    )
    types = [e.type for e in events if e.queue_id == sent.prepared.id]
    assert "bounced" in types and "deferred" not in types
    assert [h.relay for h in slow.history or ()][-2:] == ["dsn", "dsn"]


@pytest.mark.parametrize(
    ("name", "address", "cls"),
    [
        ("rfc3464-failed.eml", "louisl@larry.slip.example.edu", ReplyClass.TEMPORARY),
        ("gmail-text-failure.eml", "frank@corp.example", ReplyClass.POLICY_BLOCK),
    ],
)
async def test_a_failure_that_is_not_the_recipients_fault_bounces_without_suppressing(
    world: World, name: str, address: str, cls: ReplyClass
) -> None:
    sent = await world.send(address)
    verp = world.verp(sent, address)
    result = await world.processor.process(
        sample(name, return_path=verp), mail_from="", rcpt_to=[verp]
    )
    [item] = result.recorded
    assert (item.kind, item.cls, item.suppression) == (FeedbackKind.BOUNCED, cls, None)
    assert await world.state(sent, address) is RecipientState.BOUNCED
    assert await world.suppressions() == set()


@pytest.mark.parametrize(
    ("scope", "expected_scope"),
    [(ComplaintScope.SENDER_DOMAIN, "shop.example"), (ComplaintScope.GLOBAL, "*")],
)
async def test_a_redacted_complaint_at_the_feedback_address_is_matched_by_its_return_path(
    world: World, scope: ComplaintScope, expected_scope: str
) -> None:
    sent = await world.send("ada@mailbox.example", "bob@mailbox.example")
    world.processor.complaint_scope = scope
    arf = sample("arf-redacted.eml", return_path=world.verp(sent, "ada@mailbox.example"))
    result = await world.processor.process(
        arf, mail_from="feedbackloop@fbl.mailbox.example", rcpt_to=[f"fbl@{DOMAIN}"]
    )
    [item] = result.recorded
    assert item.kind is FeedbackKind.COMPLAINED and item.source == "arf"
    assert item.text == "complaint (abuse) by Mailbox-Feedback/1.0"
    assert await world.state(sent, "ada@mailbox.example") is RecipientState.COMPLAINED
    assert await world.state(sent, "bob@mailbox.example") is RecipientState.SENT
    assert await world.suppressions() == {("ada@mailbox.example", expected_scope, "complaint")}


async def test_a_complaint_without_a_token_is_matched_by_message_id_and_recipient(
    world: World,
) -> None:
    # Message-ID matching is opt-in ([bounces] match_message_id): this is what it does when on
    world.processor.match_message_id = True
    sent = await world.send("ada@mailbox.example.com")
    arf = sample(
        "rfc5965-abuse.eml",
        return_path="app@shop.example",
        **{"deals-2005-03-08.7@shop.example": sent.message_id.strip("<>")},
    )
    result = await world.processor.process(arf, mail_from="abusedesk@x", rcpt_to=[f"fbl@{DOMAIN}"])
    assert [i.delivery_id for i in result.recorded] == [sent.ids["ada@mailbox.example.com"]]


async def test_a_message_id_proves_nothing_for_a_message_with_several_recipients(
    world: World,
) -> None:
    """Every recipient of a message sees its Message-ID and its To header: without a token,
    bob could complain (or bounce) for ada. Such a report is kept for review."""
    # even with Message-ID matching on ([bounces] match_message_id), which this is about
    world.processor.match_message_id = True
    sent = await world.send("ada@mailbox.example.com", "bob@mailbox.example.com")
    arf = sample(
        "rfc5965-abuse.eml",
        return_path="app@shop.example",
        **{"deals-2005-03-08.7@shop.example": sent.message_id.strip("<>")},
    )
    result = await world.processor.process(arf, mail_from="bob@x", rcpt_to=[f"fbl@{DOMAIN}"])
    assert result.disposition is Disposition.UNMATCHED and result.recorded == ()
    assert result.reason is not None and "sent to that address alone" in result.reason
    assert await world.state(sent, "ada@mailbox.example.com") is RecipientState.SENT
    assert await world.suppressions() == set()


async def test_a_recipients_own_token_says_nothing_about_the_other_recipients(
    world: World,
) -> None:
    """A DSN sent to one recipient's return path (which its copy shows) naming the others of
    the message: only what it says of the token's own recipient counts."""
    to = ("arathib@vnet.example.com", "johnh@hpnjld.example.com", "wsnell@sdcc13.example.edu")
    sent = await world.send(*to)
    own = world.verp(sent, "johnh@hpnjld.example.com")
    dsn = sample(
        "rfc3464-multiple.eml",
        **{"<199407081321.JAA13162@shop.example>": sent.message_id},
    )
    result = await world.processor.process(dsn, mail_from="", rcpt_to=[own])
    assert [(i.kind, i.delivery_id) for i in result.recorded] == [
        (FeedbackKind.DELAYED, sent.ids["johnh@hpnjld.example.com"])
    ]
    assert result.reason is not None and "its token names another recipient" in result.reason
    assert [await world.state(sent, a) for a in to] == [RecipientState.SENT] * 3
    assert await world.suppressions() == set()


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("arf-not-spam.eml", ReportKind.ARF, "a not-spam feedback report, not a complaint"),
        ("rfc6591-auth-failure.eml", ReportKind.ARF, "auth-failure feedback report"),
        ("autoreply-outlook.eml", ReportKind.AUTO_REPLY, "an automatic reply (subject)"),
        ("autoreply-vacation.eml", ReportKind.AUTO_REPLY, "an automatic reply"),
        ("autoreply-cpanel.eml", ReportKind.AUTO_REPLY, "an automatic reply (x-autoreply)"),
        ("human-reply.eml", ReportKind.UNKNOWN, "neither a DSN, a complaint nor a bounce"),
    ],
)
async def test_what_is_no_bounce_is_kept_for_the_operator_and_changes_nothing(
    world: World, name: str, kind: ReportKind, reason: str
) -> None:
    sent = await world.send("ada@mailbox.example")
    verp = world.verp(sent, "ada@mailbox.example")
    content = sample(name, return_path=verp)
    result = await world.processor.process(content, mail_from="someone@x", rcpt_to=[verp])
    assert result.disposition is Disposition.UNMATCHED and result.recorded == ()
    [listed] = await world.store.list_unmatched(limit=10)
    assert listed.id == result.unmatched_id
    kept = await world.store.get_unmatched(listed.id)
    assert (kept.kind, kept.source, kept.rcpt_to) == (kind.value, "bounce listener", verp)
    assert reason in kept.reason
    assert kept.content == content and kept.size == len(content)
    assert await world.state(sent, "ada@mailbox.example") is RecipientState.SENT


async def test_a_bounce_about_an_unknown_message_is_kept_with_the_reason(world: World) -> None:
    await world.send("nobody@example.net")
    result = await world.processor.process(
        sample("postfix-failed.eml"), mail_from="", rcpt_to=[f"fbl@{DOMAIN}"]
    )
    assert result.disposition is Disposition.UNMATCHED
    assert result.reason == (
        "no delivery matches nobody@example.net (Message-ID <m1@shop.example>; no valid VERP "
        "token, and a Message-ID names only a message sent to that address alone)"
    )
    assert await world.suppressions() == set()


async def test_a_bounce_for_a_recipient_never_sent_is_kept_and_changes_nothing(
    world: World,
) -> None:
    sent = await world.send("nobody@example.net", sent=False)
    verp = world.verp(sent, "nobody@example.net")
    result = await world.processor.process(
        sample("postfix-failed.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert result.disposition is Disposition.UNMATCHED
    assert result.reason is not None and "is queued: it was never sent" in result.reason
    assert await world.state(sent, "nobody@example.net") is RecipientState.QUEUED
    assert await world.suppressions() == set()


async def test_a_forged_return_path_inside_a_report_names_nothing(world: World) -> None:
    sent = await world.send("nobody@example.net")
    forged = world.verp(sent, "nobody@example.net")[:-20] + "aaaaaaaa@bounce.example"
    result = await world.processor.process(
        sample("postfix-failed.eml", return_path=forged), mail_from="", rcpt_to=[f"fbl@{DOMAIN}"]
    )
    assert result.disposition is Disposition.UNMATCHED
    assert await world.state(sent, "nobody@example.net") is RecipientState.SENT


async def test_a_report_on_several_recipients_is_matched_by_message_id_one_by_one(
    world: World,
) -> None:
    """Without a token, each recipient the report names is matched by the Message-ID of a
    message sent to it alone; one sent to several is kept for review."""
    # Message-ID matching is opt-in ([bounces] match_message_id): this is what it does when on
    world.processor.match_message_id = True
    to = ("arathib@vnet.example.com", "johnh@hpnjld.example.com", "wsnell@sdcc13.example.edu")
    alone = await world.send(to[0])
    shared = await world.send(to[1], to[2])
    for sent in (alone, shared):
        dsn = sample(
            "rfc3464-multiple.eml",
            **{"<199407081321.JAA13162@shop.example>": sent.message_id},
        )
        result = await world.processor.process(dsn, mail_from="", rcpt_to=[f"fbl@{DOMAIN}"])
        if sent is alone:
            assert [(i.kind, i.delivery_id) for i in result.recorded] == [
                (FeedbackKind.BOUNCED, sent.ids[to[0]])
            ]
        else:
            assert result.recorded == () and result.disposition is Disposition.UNMATCHED
    assert await world.state(alone, to[0]) is RecipientState.BOUNCED
    assert [await world.state(shared, a) for a in to[1:]] == [RecipientState.SENT] * 2


async def test_a_forwarded_recipient_is_matched_by_its_token(world: World) -> None:
    """The address forwarded to failed: the delivery bounced, but the address postlane sent
    to is not proven bad, so it is not suppressed."""
    sent = await world.send("old-name@example.net")
    verp = world.verp(sent, "old-name@example.net")
    result = await world.processor.process(
        sample("postfix-failed.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert await world.state(sent, "old-name@example.net") is RecipientState.BOUNCED
    [item] = result.recorded
    assert item.delivery_id == sent.ids["old-name@example.net"]
    assert item.text is not None
    assert "(for nobody@example.net, reached through old-name@example.net)" in item.text
    assert await world.suppressions() == set()


async def test_one_failing_member_of_a_list_never_suppresses_the_list(world: World) -> None:
    """A DSN about one member (``Final-Recipient``) of the list postlane sent to (its
    ``Original-Recipient``) arrives at the list's own return path."""
    sent = await world.send("list@lists.example")
    verp = world.verp(sent, "list@lists.example")
    content = sample("postfix-failed.eml", return_path=verp).replace(
        b"Original-Recipient: rfc822;nobody@example.net",
        b"Original-Recipient: rfc822;list@lists.example",
    )
    result = await world.processor.process(content, mail_from="", rcpt_to=[verp])
    assert [i.delivery_id for i in result.recorded] == [sent.ids["list@lists.example"]]
    assert await world.suppressions() == set()
    again = await world.send("list@lists.example", sender="news@other.example")
    assert await world.state(again, "list@lists.example") is RecipientState.SENT


async def test_a_list_expansions_failures_never_bounce_the_list(world: World) -> None:
    sent = await world.send("list@lists.example")
    verp = world.verp(sent, "list@lists.example")
    content = sample("rfc3464-multiple.eml", **{"app@shop.example": verp})
    result = await world.processor.process(content, mail_from="", rcpt_to=[verp])
    assert result.disposition is Disposition.UNMATCHED
    assert result.reason is not None and "its token names another recipient" in result.reason
    assert await world.state(sent, "list@lists.example") is RecipientState.SENT


async def test_a_bounce_that_beats_the_workers_own_record_waits_for_it(world: World) -> None:
    sent = await world.send("nobody@example.net", sent=False)
    # the worker is sending it: the relay accepted, and its DSN is faster than the record
    claimed = await world.claim()
    verp = world.verp(sent, "nobody@example.net")
    dsn = sample("postfix-failed.eml", return_path=verp)

    async def worker_records_sent_later() -> None:
        await asyncio.sleep(0.2)
        await world.mark_sent(sent.ids.values(), claimed=claimed)

    recording = asyncio.create_task(worker_records_sent_later())
    result = await world.processor.process(dsn, mail_from="", rcpt_to=[verp])
    await recording
    assert result.disposition is Disposition.RECORDED
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED


async def test_a_bounce_for_a_delivery_still_being_sent_is_left_pending(world: World) -> None:
    sent = await world.send("nobody@example.net", sent=False)
    await world.claim()
    verp = world.verp(sent, "nobody@example.net")
    world.processor.in_flight_wait = 0.3
    result = await world.processor.process(
        sample("postfix-failed.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert result.disposition is Disposition.PENDING
    assert result.pending == (sent.ids["nobody@example.net"],)
    assert await world.store.list_unmatched(limit=10) == []


async def test_a_complaint_storm_is_written_in_batches_and_touches_only_its_recipients(
    world: World,
) -> None:
    complainers = [f"user{i}@mailbox.example" for i in range(600)]
    bystanders = [f"calm{i}@mailbox.example" for i in range(100)]
    sent = await world.send(*complainers, *bystanders)
    template = sample("arf-redacted.eml")
    reports = [
        template.replace(PLACEHOLDER, world.verp(sent, address).encode()) for address in complainers
    ]
    results = await asyncio.gather(
        *(world.processor.process(r, mail_from="fbl@x", rcpt_to=[f"fbl@{DOMAIN}"]) for r in reports)
    )
    assert all(r.disposition is Disposition.RECORDED for r in results)
    assert world.processor.batcher.transactions < len(reports) / 10
    states = {
        ref.address: ref.state for ref in await world.store.delivery_refs(list(sent.ids.values()))
    }
    assert {states[a] for a in complainers} == {RecipientState.COMPLAINED}
    assert {states[a] for a in bystanders} == {RecipientState.SENT}
    assert len(await world.suppressions()) == len(complainers)


async def test_a_report_that_trips_a_bug_is_kept_not_lost_nor_retried_forever(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("postlane.feedback.inbound.feedback_for", broken)
    result = await world.processor.process(
        sample("postfix-failed.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert result.disposition is Disposition.UNMATCHED
    assert result.reason == "could not be processed: ZeroDivisionError: a bug"
    assert await world.state(sent, "nobody@example.net") is RecipientState.SENT


# -- plain-text bounces through the processor ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "address", "suppressed"),
    [
        ("qmail-failure.eml", "ada@mailbox.example", True),
        ("qmail-remote.eml", "bob@corp.example", True),
        ("exim-failure.eml", "ada@mailbox.example", True),
        ("microsoft-ndr-text.eml", "carol@corp.example", True),
        ("microsoft-365-dsn.eml", "dave@contoso.example", True),
        ("gmail-dsn.eml", "erin@gmail.example", True),
        ("yahoo-failure.eml", "grace@yahoo.example", True),
        ("sendmail-failure.eml", "heidi@uni.example", True),
        ("gmail-text-failure.eml", "frank@corp.example", False),
    ],
)
async def test_each_providers_bounce_at_a_return_path_bounces_its_recipient(
    sqlite_world: World, name: str, address: str, suppressed: bool
) -> None:
    world = sqlite_world
    sent = await world.send(address)
    verp = world.verp(sent, address)
    result = await world.processor.process(
        sample(name, return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert [i.kind for i in result.recorded] == [FeedbackKind.BOUNCED], result.reason
    assert await world.state(sent, address) is RecipientState.BOUNCED
    expected = {(address, "*", "hard_bounce")} if suppressed else set()
    assert await world.suppressions() == expected


async def test_a_plain_bounce_without_a_token_is_matched_by_its_quoted_message_id(
    sqlite_world: World,
) -> None:
    world = sqlite_world
    # Message-ID matching is opt-in ([bounces] match_message_id): this is what it does when on
    world.processor.match_message_id = True
    sent = await world.send("ada@mailbox.example")
    bounce = sample("exim-failure.eml", **{"<order-44@shop.example>": sent.message_id})
    result = await world.processor.process(bounce, mail_from="", rcpt_to=[f"fbl@{DOMAIN}"])
    assert [i.delivery_id for i in result.recorded] == [sent.ids["ada@mailbox.example"]]


async def test_an_exim_delay_warning_changes_no_state(sqlite_world: World) -> None:
    world = sqlite_world
    sent = await world.send("ada@mailbox.example")
    verp = world.verp(sent, "ada@mailbox.example")
    result = await world.processor.process(
        sample("exim-delay.eml", return_path=verp), mail_from="", rcpt_to=[verp]
    )
    assert [i.kind for i in result.recorded] == [FeedbackKind.SOFT_BOUNCE]
    assert await world.state(sent, "ada@mailbox.example") is RecipientState.SENT


# -- VERP on real SMTP transactions --------------------------------------------------------------


def relay_to(peer: SMTPPeer) -> Any:
    from postlane.config import DeliveryConfig
    from postlane.transports.smtp import RelaySettings, SMTPRelayTransport

    settings = RelaySettings.from_url(peer.url, DeliveryConfig(tls_verify=False))
    return SMTPRelayTransport(settings)


def envelope(ids: Sequence[int], *to: str, sender: str = "app@shop.example") -> Envelope:
    content = (
        b"From: Shop <app@shop.example>\r\nTo: customers:;\r\nSubject: Your order\r\n"
        b"Message-ID: <order-1@shop.example>\r\n\r\nIt shipped.\r\n"
    )
    return Envelope(
        "q1", sender, tuple(to), content, "<order-1@shop.example>", delivery_ids=tuple(ids)
    )


async def test_each_recipient_gets_its_own_transaction_and_return_path(
    smtp_peer: SMTPPeer,
) -> None:
    paths = ReturnPaths(DOMAIN, bytes(32))
    transport = VerpTransport(relay_to(smtp_peer), DOMAIN, bytes(32))
    smtp_peer.handler.rcpt["bob@example.net"] = "550 5.1.1 <bob@example.net>: no such user"
    to = ("ada@example.net", "bob@example.net", "cy@example.org")
    responses = await transport.send(envelope([11, 12, 13], *to))
    await transport.close()
    assert [r.code for r in responses] == [250, 550, 250]
    received = {r.rcpt_tos[0]: r for r in smtp_peer.handler.received}
    assert set(received) == {"ada@example.net", "cy@example.org"}
    for address, delivery_id in (("ada@example.net", 11), ("cy@example.org", 13)):
        got = received[address]
        assert got.rcpt_tos == [address]  # one recipient per transaction
        assert paths.delivery_id(got.mail_from) == delivery_id
        assert got.mail_from == got.mail_from.lower()
        assert got.content.startswith(b"From: Shop <app@shop.example>\r\n")  # From: untouched


async def test_an_envelope_without_delivery_ids_goes_through_as_it_is(
    smtp_peer: SMTPPeer,
) -> None:
    transport = VerpTransport(relay_to(smtp_peer), DOMAIN, bytes(32))
    await transport.send(envelope([], "ada@example.net", "bob@example.net"))
    await transport.send(envelope([5], "ada@example.net", sender=""))
    await transport.close()
    assert [(r.mail_from, r.rcpt_tos) for r in smtp_peer.handler.received] == [
        ("app@shop.example", ["ada@example.net", "bob@example.net"]),
        ("<>", ["ada@example.net"]),
    ]


async def test_a_bounce_to_the_return_path_a_worker_used_bounces_that_recipient(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    from postlane.app import AsyncPostlane
    from postlane.transports import transport_for
    from postlane.worker import Worker
    from tests.conftest import make_config

    config = make_config(tmp_path, delivery={"relay": smtp_peer.url, "tls_verify": False})
    async with AsyncPostlane(config) as app:
        key = await app.store.secret("verp", app.clock.now())
        transport = VerpTransport(transport_for(config), DOMAIN, key)
        worker = Worker.from_config(config, app.store, transport, clock=app.clock)
        to = ["ada@example.net", "bob@example.net"]
        queued = await app.send(Message(sender="app@shop.example", to=to, subject="s", text="b"))
        assert await worker.run_until_idle() == 2
        await transport.close()
        return_paths = {r.rcpt_tos[0]: r.mail_from for r in smtp_peer.handler.received}
        # the next hop, later, bounces bob's copy to the return path it came with
        dsn = sample(
            "postfix-failed.eml",
            return_path=return_paths["bob@example.net"],
            **{"nobody@example.net": "bob@example.net"},
        )
        world = World(app.store, ReturnPaths(DOMAIN, key), FakeClock())
        async with listening(world) as (port, _):
            _, data = await asyncio.to_thread(
                smtp_send, port, "", [return_paths["bob@example.net"]], dsn
            )
        assert data[0] == 250
        view = await app.get(queued.id, history=True)
        states = {r.address: r.state for r in view.recipients}
        assert states == {
            "ada@example.net": RecipientState.SENT,
            "bob@example.net": RecipientState.BOUNCED,
        }


class _Flaky(BaseTransport):
    name = "flaky://"
    shared_destination = "relay"

    def __init__(self) -> None:
        self.paused: Any = None

    def shared_destination_for(self, lane: str, sender: str, recipient_domain: str) -> str:
        return f"route:{lane}"

    def follow_pauses(self, is_paused: Any) -> None:
        self.paused = is_paused

    async def send(self, envelope: Envelope) -> list[Response]:
        if envelope.recipients[0].startswith("boom"):
            raise RuntimeError("kaboom")
        return [Response(250, "250 ok", self.name)]


async def test_one_recipients_transport_failure_is_only_its_own_temporary_attempt() -> None:
    inner = _Flaky()
    transport = VerpTransport(inner, DOMAIN, bytes(32))
    responses = await transport.send(envelope([1, 2], "ada@example.net", "boom@example.net"))
    assert [r.verdict().cls for r in responses] == [ReplyClass.DELIVERED, ReplyClass.TEMPORARY]
    assert "kaboom" in responses[1].text
    assert transport.name == "flaky://" and transport.shared_destination == "relay"
    assert transport.shared_destination_for("high", "a@b", "c") == "route:high"
    transport.follow_pauses(bool)
    assert inner.paused is bool


# -- the listener over SMTP ----------------------------------------------------------------------


@dataclass
class Counted:
    reports: list[Any]
    refusals: list[str]

    def report(self, result: Any) -> None:
        self.reports.append(result)

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)


@contextlib.asynccontextmanager
async def listening(world: World, **options: Any) -> AsyncIterator[tuple[int, Counted]]:
    settings = BounceListenerSettings(listen=f"127.0.0.1:{free_port()}", **options)
    counted = Counted([], [])
    async with start_bounce_listener(world.processor, settings, observer=counted) as address:
        yield int(address.rpartition(":")[2]), counted


def smtp_send(port: int, mail_from: str, rcpt_to: Sequence[str], content: bytes) -> Any:
    """One transaction with Python's smtplib (in a thread): RCPT replies and the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mx.test")
        client.mail(mail_from)
        rcpt = [client.rcpt(address) for address in rcpt_to]
        if not any(code == 250 for code, _ in rcpt):
            client.rset()
            return rcpt, None
        return rcpt, client.data(content)


async def test_the_listener_records_a_dsn_from_the_null_sender_before_answering_250(
    sqlite_world: World,
) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    async with listening(world) as (port, counted):
        rcpt, data = await asyncio.to_thread(
            smtp_send, port, "<>", [verp.upper()], sample("postfix-failed.eml", return_path=verp)
        )
    assert rcpt == [(250, b"2.1.5 OK")]
    assert data[0] == 250 and b"1 bounced" in data[1]
    # the 250 came after the commit: the state is there without waiting
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED
    assert [r.disposition for r in counted.reports] == [Disposition.RECORDED]


class NotingProcessor(BounceProcessor):
    """The real processor, noting when each report starts and how many run at once."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.starts: list[float] = []
        self.running = 0
        self.most = 0

    async def process(self, content: bytes, **options: Any) -> Any:
        self.starts.append(time.monotonic())
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await super().process(content, **options)
        finally:
            self.running -= 1


async def test_while_the_worker_delivers_reports_wait_their_turn_one_at_a_time(
    sqlite_world: World,
) -> None:
    """Mail first: with the worker's attempt counter moving, the listener reads and records
    one report at a time, each starting in the first tenth of a quarter second; they are all
    recorded all the same."""
    world = sqlite_world
    processor = NotingProcessor(world.store, world.paths, clock=world.clock, in_flight_wait=0.5)
    attempts = 0

    async def delivering() -> None:  # a busy worker, as far as the listener can tell
        nonlocal attempts
        while True:
            attempts += 1
            await asyncio.sleep(0.01)

    to = [f"gone{n}@example.net" for n in range(12)]
    sent = await world.send(*to)
    settings = BounceListenerSettings(listen=f"127.0.0.1:{free_port()}")
    busy = asyncio.create_task(delivering())
    try:
        async with start_bounce_listener(
            processor, settings, mail_activity=lambda: attempts
        ) as address:
            port = int(address.rpartition(":")[2])
            replies = await asyncio.gather(
                *(
                    asyncio.to_thread(
                        smtp_send,
                        port,
                        "<>",
                        [world.verp(sent, rcpt)],
                        sample("postfix-failed.eml", return_path=world.verp(sent, rcpt)),
                    )
                    for rcpt in to
                )
            )
    finally:
        busy.cancel()
    assert all(data[0] == 250 for _rcpt, data in replies)
    assert processor.most == 1  # one at a time
    window = MailFirst.CYCLE * MAIL_FIRST_SHARE + 0.01  # (a thread switch between the two)
    late = [t % MailFirst.CYCLE for t in processor.starts if t % MailFirst.CYCLE >= window]
    assert late == []  # each started in its turn
    assert all([await world.state(sent, rcpt) is RecipientState.BOUNCED for rcpt in to])


async def test_only_valid_tokens_at_the_bounce_domain_are_accepted(sqlite_world: World) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    forged = verp[:-24] + "aaaaaaaaaaaaaaaa@bounce.example"
    candidates = [
        forged,
        verp.replace(DOMAIN, "elsewhere.example"),  # never a relay
        f"postmaster@{DOMAIN}",
        "victim@example.net",
        f"fbl@{DOMAIN}",
    ]
    async with listening(world, report_addresses=("fbl",)) as (port, counted):
        rcpt, data = await asyncio.to_thread(
            smtp_send, port, "attacker@evil.example", candidates, sample("postfix-failed.eml")
        )
    # postmaster is taken, as RFC 5321 4.5.1 requires of every domain a server receives for,
    # and read as a report address's mail is (here: kept unmatched, no token names anybody)
    assert [code for code, _ in rcpt] == [550, 550, 250, 550, 250]
    assert all(text == b"5.1.1 No such recipient here" for code, text in rcpt if code == 550)
    assert counted.refusals == ["recipient"] * 3
    assert data[0] == 250  # at fbl@ and postmaster@: kept unmatched
    assert await world.state(sent, "nobody@example.net") is RecipientState.SENT


async def test_a_message_over_the_size_limit_is_refused_with_552(sqlite_world: World) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    big = sample("postfix-failed.eml", return_path=verp) + b"x" * 200_000 + b"\r\n"
    async with listening(world, max_size=100_000) as (port, counted):
        _, refused = await asyncio.to_thread(smtp_send, port, "", [verp], big)
        # the next, smaller one is taken
        _, data = await asyncio.to_thread(
            smtp_send, port, "", [verp], sample("postfix-failed.eml", return_path=verp)
        )
    assert refused[0] == 552
    assert counted.refusals == ["size"] and data[0] == 250


async def test_a_25_mb_bounce_is_recorded_and_only_a_bounded_part_is_kept(
    sqlite_world: World,
) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net", "ada@example.net")
    verp = world.verp(sent, "nobody@example.net")
    line = b"A" * 998 + b"\r\n"
    huge = sample("postfix-failed.eml", return_path=verp).replace(
        b"\r\nHello\r\n", b"\r\n" + line * 24_000 + b"\r\n"
    )
    assert 24_000_000 < len(huge) < 25 * 1024 * 1024
    async with listening(world) as (port, _):
        _, data = await asyncio.to_thread(smtp_send, port, "", [verp], huge)
        # a human's reply as big is kept for review, cut to a bounded part
        reply = sample("human-reply.eml", return_path=verp) + line * 24_000
        _, kept_reply = await asyncio.to_thread(smtp_send, port, "", [verp], reply)
    assert data[0] == 250 and kept_reply[0] == 250
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED
    [listed] = await world.store.list_unmatched(limit=10)
    kept = await world.store.get_unmatched(listed.id)
    assert kept.content is not None
    assert kept.kind == "unknown" and 0 < len(kept.content) == kept.size <= 1024 * 1024


async def test_clients_over_the_connection_cap_are_told_421(sqlite_world: World) -> None:
    async with listening(sqlite_world, max_connections=2) as (port, counted):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"421 4.7.0")
        writer.close()
        for _, held_writer in held:
            held_writer.close()
    assert counted.refusals == ["connections"]


async def test_one_address_gets_only_its_share_of_the_connections(sqlite_world: World) -> None:
    """One client cannot hold every connection and keep the internet's bounces out."""
    async with listening(sqlite_world, max_connections=10, max_connections_per_address=2) as (
        port,
        counted,
    ):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == (
            b"421 4.7.0 Too many connections from your address, try again later\r\n"
        )
        writer.close()
        held[0][1].close()
        await held[0][1].wait_closed()
        async with asyncio.timeout(5):  # its place is free again once the server notices
            while True:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                greeting = await reader.readline()
                writer.close()
                if greeting.startswith(b"220"):
                    break
        held[1][1].close()
    assert counted.refusals[0] == "connections"


async def test_a_client_saying_only_noop_is_dropped_after_100(sqlite_world: World) -> None:
    """Without the limit a NOOP before each timeout would hold a connection for ever."""
    async with listening(sqlite_world) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"EHLO mta.example\r\n" + b"NOOP\r\n" * 101)
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
    lines = answer.splitlines()
    assert lines.count(b"250 OK") == 100
    assert lines[-1] == b"421 4.7.0 Error: too many commands that move no mail, goodbye"


async def test_a_client_moving_mail_may_noop_between_messages(sqlite_world: World) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    dsn = sample("postfix-failed.eml", return_path=verp)
    async with listening(world) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"EHLO mta.example\r\n" + b"NOOP\r\n" * 90)
        writer.write(b"MAIL FROM:<>\r\nRCPT TO:<" + verp.encode() + b">\r\nDATA\r\n")
        writer.write(dsn + b"\r\n.\r\n" + b"NOOP\r\n" * 90 + b"QUIT\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
    lines = answer.splitlines()
    assert lines.count(b"250 OK") == 180 and lines[-1].startswith(b"221")


async def test_an_idle_client_is_dropped_after_the_timeout(sqlite_world: World) -> None:
    async with listening(sqlite_world, timeout=0.3) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server, not by the test
        writer.close()


async def test_a_store_that_cannot_record_gets_451_and_the_retry_is_recorded(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    dsn = sample("postfix-failed.eml", return_path=verp)

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("database is locked")

    async with listening(world) as (port, counted):
        with monkeypatch.context() as patch:
            patch.setattr(world.store, "record_feedback", unavailable)
            _, refused = await asyncio.to_thread(smtp_send, port, "", [verp], dsn)
        assert refused[0] == 451
        assert await world.state(sent, "nobody@example.net") is RecipientState.SENT
        _, data = await asyncio.to_thread(smtp_send, port, "", [verp], dsn)
    assert data[0] == 250
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED
    assert counted.refusals == ["store"]


async def test_a_report_about_a_delivery_still_being_sent_gets_451(sqlite_world: World) -> None:
    world = sqlite_world
    sent = await world.send("nobody@example.net", sent=False)
    await world.claim()
    verp = world.verp(sent, "nobody@example.net")
    world.processor.in_flight_wait = 0.2
    async with listening(world) as (port, _):
        _, refused = await asyncio.to_thread(
            smtp_send, port, "", [verp], sample("postfix-failed.eml", return_path=verp)
        )
    assert refused[0] == 451 and b"still being sent" in refused[1]


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.db"


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    content=st.one_of(
        st.binary(max_size=3000),
        st.sampled_from(sorted(p.name for p in DATA.glob("*.eml")))
        .flatmap(
            lambda name: st.tuples(st.just(name), st.integers(0, 3000), st.binary(max_size=100))
        )
        .map(lambda t: sample(t[0])[: t[1]] + t[2] + sample(t[0])[t[1] :]),
    ),
)
def test_whatever_arrives_gets_an_answer_and_the_listener_stays_up(
    fuzz_store: Path, content: bytes
) -> None:
    async def run() -> None:
        store = SQLiteStore(fuzz_store)
        await store.open()
        try:
            world = World(store, ReturnPaths(DOMAIN, await store.secret("verp", T0)), FakeClock())
            sent = await world.send("nobody@example.net")
            verp = world.verp(sent, "nobody@example.net")
            async with listening(world) as (port, _):
                body = content if content.endswith(b"\r\n") else content + b"\r\n"
                _, data = await asyncio.to_thread(smtp_send, port, "", [verp], body)
                assert data[0] == 250
                # and it still answers the next client
                _, again = await asyncio.to_thread(
                    smtp_send, port, "", [verp], sample("human-reply.eml")
                )
                assert again[0] == 250
        finally:
            await store.close()

    asyncio.run(run())


# -- serve, configured with [bounces] ------------------------------------------------------------


async def test_serve_gives_each_recipient_a_return_path_and_records_what_comes_back(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    """[bounces] domain is all it takes: serve's worker sends with VERP return paths, serve
    listens on [bounces] listen, a DSN there bounces the recipient, and the metrics count it."""
    import time

    import httpx

    from tests.conftest import make_config

    bounce_port, http_port, smtp_port = free_port(), free_port(), free_port()
    config = make_config(
        tmp_path,
        delivery={"relay": smtp_peer.url, "poll_interval": "100ms"},
        bounces={"domain": DOMAIN, "listen": f"127.0.0.1:{bounce_port}"},
        http={"listen": f"127.0.0.1:{http_port}"},
        smtp={"listen": f"127.0.0.1:{smtp_port}"},
    )
    async with serve_in_process(config) as app:
        to = ["ada@example.net", "bob@example.net"]
        queued = await app.send(Message(sender="app@shop.example", to=to, subject="s", text="b"))
        deadline = time.monotonic() + 30
        while len(smtp_peer.handler.received) < 2:
            assert time.monotonic() < deadline, "the worker did not deliver"
            await asyncio.sleep(0.02)
        return_paths = {r.rcpt_tos[0]: r.mail_from for r in smtp_peer.handler.received}
        assert all(
            path.startswith("b-") and path.endswith(f"@{DOMAIN}") for path in return_paths.values()
        )
        assert len(set(return_paths.values())) == 2  # one per recipient
        dsn = sample(
            "postfix-failed.eml",
            return_path=return_paths["bob@example.net"],
            **{"nobody@example.net": "bob@example.net"},
        )
        _, data = await asyncio.to_thread(
            smtp_send, bounce_port, "", [return_paths["bob@example.net"]], dsn
        )
        assert data[0] == 250
        view = await app.get(queued.id)
        assert {r.address: r.state for r in view.recipients} == {
            "ada@example.net": RecipientState.SENT,
            "bob@example.net": RecipientState.BOUNCED,
        }
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            metrics = (await client.get("/metrics")).text
        assert 'postlane_feedback_total{source="dsn",type="bounced"} 1.0' in metrics
        assert 'postlane_bounces_total{type="hard"} 1.0' in metrics
        assert 'postlane_feedback_reports_total{disposition="recorded",kind="dsn"} 1.0' in metrics


async def test_a_bounce_for_a_quoted_recipient_or_a_literal_bounces_it_by_its_token(
    sqlite_world: World,
) -> None:
    """The return path names the delivery, not the address: a recipient with quotes, a space,
    an ``@`` or an address literal is bounced and suppressed as any other."""
    world = sqlite_world
    to = ['"john doe"@example.net', '"a@b"@example.net', "ann@[192.0.2.1]"]
    sent = await world.send(*to)
    async with listening(world) as (port, _):
        for address in to:
            verp = world.verp(sent, address)
            dsn = sample("postfix-failed.eml", return_path=verp, **{"nobody@example.net": address})
            _, data = await asyncio.to_thread(smtp_send, port, "", [verp], dsn)
            assert data[0] == 250
    assert [await world.state(sent, address) for address in to] == [RecipientState.BOUNCED] * 3
    assert {address for address, _, _ in await world.suppressions()} == set(to)


async def test_the_bounce_listener_takes_no_address_literal_but_its_own_quoting(
    sqlite_world: World,
) -> None:
    """Only the bounce domain is served: a literal (this very host's) is refused like any other
    domain. A token or postmaster needlessly quoted is the same address (RFC 5321 4.1.2)."""
    world = sqlite_world
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    token = verp.rpartition("@")[0]
    candidates = [
        "postmaster@[127.0.0.1]",
        f"{token}@[127.0.0.1]",
        f'"{token}"@{DOMAIN}',
        f'"postmaster"@{DOMAIN}',
    ]
    async with listening(world) as (port, counted):
        rcpt, data = await asyncio.to_thread(
            smtp_send, port, "", candidates, sample("postfix-failed.eml", return_path=verp)
        )
    assert [code for code, _ in rcpt] == [550, 550, 250, 250]
    assert counted.refusals == ["recipient"] * 2
    assert data[0] == 250
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED


# -- proof: without a VERP token, a Message-ID alone applies nothing (security audit) ------------


def forged_dsn(victim: str, message_id: str) -> bytes:
    """The audit's forgery: a DSN anybody can write, saying ``victim`` failed with 5.1.1 and
    quoting the headers of the message with ``message_id`` (no return path in it)."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.attacker.example>\r\n"
        f"To: postmaster@{DOMAIN}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="F"\r\n'
        "\r\n"
        "--F\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "Your message could not be delivered.\r\n"
        "--F\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.attacker.example\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {victim}\r\n"
        "Action: failed\r\n"
        "Status: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{victim}>: Recipient address rejected: User unknown\r\n"
        "--F\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        "From: Shop <app@shop.example>\r\n"
        f"To: {victim}\r\n"
        "Subject: hello\r\n"
        f"Message-ID: {message_id}\r\n"
        "--F--\r\n"
    ).encode()


def not_applied(delivery_id: int, message_id: str) -> str:
    """The note of a report that only a Message-ID matched, with match_message_id off."""
    return (
        f"matches delivery {delivery_id} of {message_id} by Message-ID only, without a VERP "
        "token: not applied ([bounces] match_message_id is off)"
    )


@pytest.mark.parametrize("match_message_id", [None, True])
async def test_a_send_token_cannot_bounce_a_recipient_with_a_forged_dsn_to_postmaster(
    tmp_path: Path, smtp_peer: SMTPPeer, match_message_id: bool | None
) -> None:
    """The audit's reproduction, end to end through serve: a caller with only a send token
    sends one message to the victim, reads its Message-ID back, and mails a DSN naming it to
    postmaster@ of the bounce domain. By default (None: the setting left out) the victim stays
    sent and unsuppressed, and the report is kept for review saying what it would have
    matched; with ``[bounces] match_message_id = true`` it bounces and suppresses, as before."""
    import httpx

    from tests.conftest import make_config

    victim, send_token = "victim@example.net", "send-scope-token-for-the-audit"
    bounce_port, http_port, smtp_port = free_port(), free_port(), free_port()
    bounces: dict[str, Any] = {"domain": DOMAIN, "listen": f"127.0.0.1:{bounce_port}"}
    if match_message_id is not None:
        bounces["match_message_id"] = match_message_id
    config = make_config(
        tmp_path,
        delivery={"relay": smtp_peer.url, "poll_interval": "100ms"},
        bounces=bounces,
        http={"listen": f"127.0.0.1:{http_port}", "send_tokens": [send_token]},
        smtp={"listen": f"127.0.0.1:{smtp_port}"},
    )
    async with serve_in_process(config) as app:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}",
            headers={"Authorization": f"Bearer {send_token}"},
        ) as sender:
            sent = await sender.post(
                "/v1/messages",
                json={"from": "app@shop.example", "to": [victim], "subject": "hi", "text": "b"},
            )
            assert sent.status_code == 202, sent.text
            queue_id = sent.json()["id"]
            message_id = (await sender.get(f"/v1/messages/{queue_id}")).json()["message_id"]
        deadline = time.monotonic() + 30
        while (await app.get(queue_id)).recipients[0].state is not RecipientState.SENT:
            assert time.monotonic() < deadline, "the worker did not deliver"
            await asyncio.sleep(0.02)
        rcpt, data = await asyncio.to_thread(
            smtp_send, bounce_port, "", [f"postmaster@{DOMAIN}"], forged_dsn(victim, message_id)
        )
        assert rcpt == [(250, b"2.1.5 OK")] and data[0] == 250
        [recipient] = (await app.get(queue_id)).recipients
        suppressions = {(s.address, s.scope, s.reason) for s in await app.suppressions()}
        unmatched = await app.store.list_unmatched(limit=10)
        if match_message_id:
            assert recipient.state is RecipientState.BOUNCED
            assert suppressions == {(victim, "*", "hard_bounce")}
            assert unmatched == []
        else:
            assert recipient.state is RecipientState.SENT
            assert suppressions == set()
            [kept] = unmatched
            assert kept.kind == "dsn" and kept.rcpt_to == f"postmaster@{DOMAIN}"
            [ref] = await app.store.find_deliveries(victim, queue_id=queue_id)
            assert kept.reason == f"{victim} " + not_applied(ref.delivery_id, message_id)


@pytest.mark.parametrize("match_message_id", [False, True])
async def test_a_complaint_without_a_token_at_a_report_address_applies_only_by_choice(
    world: World, match_message_id: bool
) -> None:
    """The same forgery as an ARF complaint at the feedback loop's address: its original
    names the recipient and the Message-ID, but no return path of postlane's."""
    world.processor.match_message_id = match_message_id
    sent = await world.send("ada@mailbox.example.com")
    arf = sample(
        "rfc5965-abuse.eml",
        return_path="app@shop.example",
        **{"deals-2005-03-08.7@shop.example": sent.message_id.strip("<>")},
    )
    async with listening(world, report_addresses=("fbl",)) as (port, counted):
        rcpt, data = await asyncio.to_thread(
            smtp_send, port, "abusedesk@mailbox.example.com", [f"fbl@{DOMAIN}"], arf
        )
    assert rcpt == [(250, b"2.1.5 OK")] and data[0] == 250
    [result] = counted.reports
    state = await world.state(sent, "ada@mailbox.example.com")
    if match_message_id:
        assert result.disposition is Disposition.RECORDED
        assert state is RecipientState.COMPLAINED
        assert await world.suppressions() == {
            ("ada@mailbox.example.com", "shop.example", "complaint")
        }
    else:
        assert result.disposition is Disposition.UNMATCHED and result.recorded == ()
        assert state is RecipientState.SENT
        assert await world.suppressions() == set()
        assert result.unmatched_id is not None
        kept = await world.store.get_unmatched(result.unmatched_id)
        assert kept.kind == "arf"
        assert kept.reason == "ada@mailbox.example.com " + not_applied(
            sent.ids["ada@mailbox.example.com"], sent.message_id
        )


async def test_a_forged_dsn_naming_a_recipient_of_several_is_kept_without_a_match_note(
    world: World,
) -> None:
    """A Message-ID seen by several recipients is never a match, on or off: the note says
    nothing matched (it must not point the operator at a delivery)."""
    sent = await world.send("victim@example.net", "other@example.net")
    result = await world.processor.process(
        forged_dsn("victim@example.net", sent.message_id),
        mail_from="",
        rcpt_to=[f"postmaster@{DOMAIN}"],
    )
    assert result.disposition is Disposition.UNMATCHED
    assert result.reason is not None and result.reason.startswith("no delivery matches victim@")
    assert await world.state(sent, "victim@example.net") is RecipientState.SENT
    assert await world.suppressions() == set()


@pytest.mark.parametrize("where", ["rcpt to", "quoted return path"])
async def test_a_bounce_with_a_token_still_applies_with_message_id_matching_off(
    world: World, where: str
) -> None:
    """Proof is a valid VERP token: at RCPT TO, or quoted in the report (the original's
    Return-Path, X-Postfix-Sender) when it comes to postmaster@ or a report address."""
    assert world.processor.match_message_id is False  # the default
    sent = await world.send("nobody@example.net")
    verp = world.verp(sent, "nobody@example.net")
    rcpt_to = verp if where == "rcpt to" else f"postmaster@{DOMAIN}"
    dsn = sample("postfix-failed.eml", return_path=verp, **{"<m1@shop.example>": sent.message_id})
    async with listening(world) as (port, counted):
        _, data = await asyncio.to_thread(smtp_send, port, "", [rcpt_to], dsn)
    assert data[0] == 250 and b"1 bounced" in data[1]
    assert [r.disposition for r in counted.reports] == [Disposition.RECORDED]
    assert await world.state(sent, "nobody@example.net") is RecipientState.BOUNCED
    assert await world.suppressions() == {("nobody@example.net", "*", "hard_bounce")}


async def test_an_operator_applies_a_report_kept_for_its_message_id_only(
    sqlite_world: World, tmp_path: Path
) -> None:
    """A report without a token is kept, not applied (the security audit); `postlane feedback
    apply ID` records it once an operator has judged it genuine, and forgets the kept copy."""
    from click.testing import CliRunner

    from postlane.cli import main

    world = sqlite_world
    sent = await world.send("ada@example.net")
    kept = await world.processor.process(
        forged_dsn("ada@example.net", sent.message_id),
        mail_from="",
        rcpt_to=[f"postmaster@{DOMAIN}"],
    )
    assert kept.unmatched_id is not None and kept.recorded == ()
    config = tmp_path / "postlane.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "bounces.db"}"\n[bounces]\ndomain = "{DOMAIN}"\n'
    )

    def cli(*args: str) -> tuple[int, str]:
        with CliRunner().isolation() as (out, err, _):
            try:
                main(["--config", str(config), *args])
            except SystemExit as exc:
                return int(exc.code or 0), out.getvalue().decode() + err.getvalue().decode()
        return 0, out.getvalue().decode()

    code, said = await asyncio.to_thread(cli, "feedback", "apply", str(kept.unmatched_id))
    assert code == 0, said
    assert said.strip() == f"report {kept.unmatched_id}: 1 bounced"
    assert await world.state(sent, "ada@example.net") is RecipientState.BOUNCED
    assert await world.suppressions() == {("ada@example.net", "*", "hard_bounce")}
    assert await world.store.list_unmatched(limit=10) == []
    code, said = await asyncio.to_thread(cli, "feedback", "apply", str(kept.unmatched_id))
    assert code == 1 and f"no unmatched report {kept.unmatched_id}" in said
    # a report that names nothing sent is said so, and stays kept, once
    other = await world.processor.process(
        forged_dsn("nobody@example.net", "<unknown@shop.example>"),
        mail_from="",
        rcpt_to=[f"postmaster@{DOMAIN}"],
    )
    assert other.unmatched_id is not None
    code, said = await asyncio.to_thread(cli, "feedback", "apply", str(other.unmatched_id))
    assert code == 1
    [line] = said.strip().splitlines()  # one line, postlane's way, saying why
    assert line.startswith(f"postlane: refused: report {other.unmatched_id} was not applied, ")
    assert "nobody@example.net" in line and "kept for review" not in line
    assert [r.id for r in await world.store.list_unmatched(limit=10)] == [other.unmatched_id]
    # a message with several recipients: its Message-ID proves nothing, even to apply, and the
    # operator is told so (an audit was told "names no delivery that was sent")
    several = await world.send("c1@example.net", "c2@example.net")
    kept_several = await world.processor.process(
        forged_dsn("c1@example.net", several.message_id),
        mail_from="",
        rcpt_to=[f"postmaster@{DOMAIN}"],
    )
    assert kept_several.unmatched_id is not None
    code, said = await asyncio.to_thread(cli, "feedback", "apply", str(kept_several.unmatched_id))
    assert code == 1 and "a Message-ID names only a message sent to that address alone" in said
    assert kept_several.reason is not None and kept_several.reason in said
