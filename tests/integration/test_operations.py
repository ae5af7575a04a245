"""Operator commands on a populated queue: every selector, the confirmation, export and import,
dead-letter triage, and actions racing a running worker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from postlane.app import AsyncPostlane, QueueAction
from postlane.classify import ReplyClass
from postlane.cli import actions, main
from postlane.clock import FakeClock
from postlane.config import Config
from postlane.message import Lane, Message, RecipientState
from postlane.records import (
    AttemptRecord,
    Deferral,
    DestinationStatus,
    Outcome,
    Selector,
    Suppression,
)
from postlane.store import Store
from postlane.throttle import LIFTED
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import SMTPPeer, make_config

ALL = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


def cli(config: Config, *args: str, input: str | None = None) -> tuple[int, str, str]:
    """Run the real entry point in-process: (exit code, stdout, stderr)."""
    runner = CliRunner()
    path = config.base_dir / "postlane.toml"
    with runner.isolation(input=input) as (out, err, _):
        try:
            main(["--config", str(path), *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue().decode(), err.getvalue().decode()


def write_config(tmp_path: Path) -> Config:
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "q.db"}"\n'
        f'[delivery]\nrelay = "capture://{tmp_path / "captured"}"\n'
    )
    return make_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 'q.db'}"})


def attempt(cls: ReplyClass, code: int, text: str) -> AttemptRecord:
    return AttemptRecord(time.time(), cls, code, None, text, "smtp://relay:25", "x", 5)


async def populate(config: Config) -> dict[str, str]:
    """A queue with every state: returns names -> queue ids."""
    ids: dict[str, str] = {}
    async with AsyncPostlane(config) as app:

        async def send(name: str, *to: str, **kw: Any) -> None:
            result = await app.send(
                sender=kw.pop("sender", "app@example.com"), to=list(to), text="x", **kw
            )
            ids[name] = result.id

        await send("queued_high", "a@gmail.com", lane="high", metadata={"tenant": "t1"})
        await send("news", "b@example.net", "c@example.org", lane="low", sender="news@example.com")
        await send("deferred", "d@yahoo.com")
        await send("dead1", "bounce1@example.net")
        await send("dead2", "bounce2@example.net")
        await send("sent", "e@example.net")
        now = time.time()
        claimed = await app.store.claim_due("w", ALL, limit=100, now=now, lease_until=now + 60)
        by_id = {m.queue_id: m for m in claimed}
        outcomes = []
        for name, state, cls, code, text in (
            ("deferred", RecipientState.DEFERRED, ReplyClass.TEMPORARY, 451, "451 4.3.0 try later"),
            (
                "dead1",
                RecipientState.DEAD,
                ReplyClass.HARD_BOUNCE,
                550,
                "550 5.1.1 <bounce1@example.net> unknown id AB12CD34EF",
            ),
            (
                "dead2",
                RecipientState.DEAD,
                ReplyClass.HARD_BOUNCE,
                550,
                "550 5.1.1 <bounce2@example.net> unknown id XY98ZW76QP",
            ),
            ("sent", RecipientState.SENT, ReplyClass.DELIVERED, 250, "250 ok"),
        ):
            for d in by_id[ids[name]].deliveries:
                nxt = now + 3600 if state is RecipientState.DEFERRED else None
                outcomes.append(Outcome(d.id, state, 1, 0, nxt, attempt(cls, code, text)))
        await app.store.record("w", outcomes, now)
        await app.store.hand_back("w", None, now)
    return ids


@pytest.fixture
def queue(tmp_path: Path) -> tuple[Config, dict[str, str]]:
    config = write_config(tmp_path)
    return config, asyncio.run(populate(config))


def listed(config: Config, *args: str) -> list[dict[str, Any]]:
    code, out, err = cli(config, "queue", "list", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_every_selector_of_queue_list(queue: tuple[Config, dict[str, str]]) -> None:
    config, ids = queue

    def names(*args: str) -> set[str]:
        by_id = {v: k for k, v in ids.items()}
        return {by_id[m["id"]] for m in listed(config, *args)}

    assert names() == {"queued_high", "news", "deferred"}
    assert names("--lane", "high") == {"queued_high"}
    assert names("--state", "deferred") == {"deferred"}
    assert names("--state", "dead") == {"dead1", "dead2"}
    assert names("--state", "sent") == {"sent"}
    assert names("--domain", "example.org") == {"news"}
    assert names("--class", "temporary") == {"deferred"}
    assert names("--sender", "news@example.com") == {"news"}
    assert names("--recipient", "a@gmail.com") == {"queued_high"}
    assert names("--metadata", "tenant=t1") == {"queued_high"}
    assert names("--older-than", "1h") == set()
    assert names("--lane", "low", "--domain", "example.net") == {"news"}


def test_a_listing_cut_at_its_limit_says_so(
    queue: tuple[Config, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mailq's footer is the queue's total: a listing cut at --limit must not pass for it."""
    config, _ = queue
    code, out, err = cli(config, "queue", "list", "--limit", "2")
    assert code == 0 and "in 2 messages shown," in out
    assert "the first 2 messages are shown; more match (narrow the selection, raise" in err
    # a scale audit: at the largest listing (MAX_LIMIT, here made 2) the one more read to
    # know whether more match was cut off, and the footer passed for the queue's total
    monkeypatch.setattr("postlane.app.MAX_LIMIT", 2)
    code, out, err = cli(config, "queue", "list", "--limit", "2")
    assert code == 0 and "in 2 messages shown," in out and "more match" in err
    code, out, err = cli(config, "dlq", "list", "--rows", "--limit", "2")
    assert code == 0 and "more match" not in err  # one dead letter: all of them
    monkeypatch.undo()
    code, out, err = cli(config, "queue", "list", "--limit", "2", "--json")
    assert code == 0 and len(json.loads(out)) == 2 and "more match" in err
    code, out, err = cli(config, "queue", "list", "--limit", "1000")
    assert code == 0 and "shown" not in out and "more match" not in err
    code, _, err = cli(config, "dlq", "list", "--rows", "--limit", "1")
    assert code == 0 and "the first 1 dead letters are shown" in err


def test_an_interrupted_action_says_what_it_had_done(
    queue: tuple[Config, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale audit: Ctrl-C half-way through a bulk action said only "Aborted.", though
    40,500 recipients had been deleted (and exported) by then: the operator could not tell
    whether anything had happened. It says how many, the rest being as it was."""
    config, _ = queue
    act, apply = AsyncPostlane.act, AsyncPostlane._apply
    slices: list[list[int]] = []

    async def in_slices_of_one(self: AsyncPostlane, *args: Any, **kwargs: Any) -> Any:
        return await act(self, *args, **{**kwargs, "slice_size": 1})

    async def until_the_second(self: AsyncPostlane, action: Any, ids: Any, states: Any) -> int:
        if slices:
            raise KeyboardInterrupt  # Ctrl-C during the second slice
        slices.append(ids)
        return await apply(self, action, ids, states)

    monkeypatch.setattr(AsyncPostlane, "act", in_slices_of_one)
    monkeypatch.setattr(AsyncPostlane, "_apply", until_the_second)
    code, _, err = cli(config, "queue", "hold", "--all")
    assert code != 0
    assert (
        "interrupted: 1 recipient(s) had been held; the rest of the selection is as it was" in err
    )


def test_a_ctrl_c_while_a_slice_is_being_written_counts_that_slice(
    queue: tuple[Config, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C cancels the command's task while the store commits a slice: the slice is the
    store's by then, and it is counted (an operator audit saw 13,500 said for 14,000 deleted
    and exported, two runs in four)."""
    config, _ = queue
    act, apply = AsyncPostlane.act, AsyncPostlane._apply
    slices: list[list[int]] = []

    async def in_slices_of_one(self: AsyncPostlane, *args: Any, **kwargs: Any) -> Any:
        return await act(self, *args, **{**kwargs, "slice_size": 1})

    async def ctrl_c_during_the_second(
        self: AsyncPostlane, action: Any, ids: Any, states: Any
    ) -> Any:
        slices.append(ids)
        if len(slices) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the runner cancels the command's task
            await asyncio.sleep(0)  # ... which is waiting for this slice's commit
        return await apply(self, action, ids, states)

    monkeypatch.setattr(AsyncPostlane, "act", in_slices_of_one)
    monkeypatch.setattr(AsyncPostlane, "_apply", ctrl_c_during_the_second)
    code, _, err = cli(config, "queue", "hold", "--all")
    assert code != 0 and len(slices) == 2, err
    assert (
        "interrupted: 2 recipient(s) had been held; the rest of the selection is as it was" in err
    )
    monkeypatch.undo()
    held = [m for m in listed(config) if m["recipients"][0]["state"] == "held"]
    assert len(held) == 2


async def test_flushing_again_and_again_never_dead_letters_mail_sooner(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    """An operator audit: a tired operator flushed a deferred message seven times in twelve
    seconds, and it was dead ("max_attempts 8 reached") with two days of max_age ahead.
    Postfix's postqueue -f never bounces mail sooner: a flushed try that fails for a while uses
    no attempt; the schedule's own tries still count."""
    clock = FakeClock()
    config = make_config(tmp_path, delivery={"relay": smtp_peer.url}, retry={"max_attempts": 3})
    smtp_peer.handler.rcpt["x@defer.example"] = "450 4.2.0 mailbox busy, try again later"
    async with AsyncPostlane(config, clock=clock) as app:
        queue_id = (await app.send(sender="a@example.com", to=["x@defer.example"], text="x")).id
        transport = transport_for(config)
        worker = Worker.from_config(config, app.store, transport, clock=clock)
        await worker.run_until_idle()  # the first try: one attempt
        for _ in range(7):
            await clock.advance(1.5)
            assert await app.act(QueueAction.FLUSH, Selector(ids=(queue_id,))) == 1
            await worker.run_until_idle()
        [recipient] = (await app.get(queue_id, history=True)).recipients
        assert recipient.state is RecipientState.DEFERRED and recipient.attempts == 1
        assert len(recipient.history or ()) == 8  # every try is in its history
        # the schedule's next tries count: the third attempt dead-letters, as configured
        for _ in range(2):
            await clock.advance(recipient.next_attempt_at - clock.now())
            await worker.run_until_idle()
            [recipient] = (await app.get(queue_id)).recipients
        await transport.close()
    assert recipient.state is RecipientState.DEAD and recipient.attempts == 3
    assert "max_attempts 3" in (recipient.reason or "")


def test_suppress_list_finds_an_address_entries(queue: tuple[Config, dict[str, str]]) -> None:
    config, _ = queue
    assert cli(config, "suppress", "add", "old@example.net", "--reason", "hard_bounce")[0] == 0
    code, out, err = cli(config, "suppress", "list", "OLD@example.net", "--json")
    assert code == 0, err
    assert [(e["address"], e["reason"]) for e in json.loads(out)] == [
        ("old@example.net", "hard_bounce")
    ]
    code, out, _ = cli(config, "suppress", "list", "none@example.net")
    assert code == 0 and "No entry for none@example.net" in out


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_an_export_that_cannot_be_written_removes_nothing_and_says_so(
    queue: tuple[Config, dict[str, str]],
) -> None:
    config, _ = queue
    before = listed(config)
    code, _, err = cli(config, "queue", "delete", "--all", "--yes", "--export", "/dev/full")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "postlane: error: cannot write /dev/full: No space left on device; what was not "
        "exported was not removed"
    )
    assert listed(config) == before


def test_a_delete_says_what_it_left_because_it_was_being_sent(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    async def setup() -> None:
        async with AsyncPostlane(config) as app:
            await app.send(sender="a@example.com", to=["ada@example.net"], text="x")
            await app.send(sender="a@example.com", to=["bob@example.net"], text="x")
            now = time.time()
            await app.store.claim_due("w", ALL, limit=1, now=now, lease_until=now + 600)

    asyncio.run(setup())
    # counted as the hold went, not in a count taken before it (an operator audit saw "held
    # 15,756" with 32 being sent, 670 more having been delivered meanwhile); --yes is taken
    # by every action, for scripts that pass it to all of them
    code, _, err = cli(config, "queue", "hold", "--all", "--yes")
    assert code == 0, err
    assert err.strip().splitlines()[-2:] == [
        "held 1 recipient(s)",
        "1 more were being sent: each is held once its try is recorded, unless the try delivers it",
    ]
    code, _, err = cli(config, "queue", "release", "--all")
    assert code == 0 and err.strip().splitlines()[-2:] == [
        "released 1 recipient(s)",
        "1 more were being sent with a hold pending: it is cancelled, their tries decide",
    ]
    code, _, err = cli(config, "queue", "delete", "--all", "--yes")
    assert code == 0
    lines = err.strip().splitlines()
    assert "deleted 1 recipient(s)" in lines[-2]
    assert lines[-1] == (
        "1 recipient(s) of the selection were being sent and were left alone; delete again "
        "once their tries are recorded"
    )


def test_older_than_selects_what_arrived_before(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    async def arrive(hours_ago: float) -> str:
        async with AsyncPostlane(config) as app:
            prepared = app.prepare(Message(sender="a@example.com", to=["b@example.net"], text="x"))
            [result] = await app.store.enqueue([prepared], time.time() - hours_ago * 3600)
            return result.id

    old, new = asyncio.run(arrive(3)), asyncio.run(arrive(0))
    assert [m["id"] for m in listed(config, "--older-than", "2h")] == [old]
    assert listed(config, "--older-than", "4h") == []
    assert {m["id"] for m in listed(config)} == {old, new}
    code, _, err = cli(config, "queue", "hold", "--all", "--older-than", "2h")
    assert code == 0 and "held 1" in err
    assert [m["id"] for m in listed(config, "--state", "held")] == [old]


def test_human_listing_shows_the_delay_reason(queue: tuple[Config, dict[str, str]]) -> None:
    config, ids = queue
    code, out, _ = cli(config, "queue", "list")
    assert code == 0
    assert ids["deferred"] in out and "451 4.3.0" in out and "try later" in out


def test_flush_makes_deferred_due_now(queue: tuple[Config, dict[str, str]]) -> None:
    config, _ids = queue
    code, _, err = cli(config, "queue", "flush", "--domain", "yahoo.com")
    assert code == 0 and "flushed 1" in err
    [message] = listed(config, "--domain", "yahoo.com")
    r = message["recipients"][0]
    assert r["state"] == "queued" and r["attempts"] == 1  # flushing uses no attempt


def test_flush_by_id_makes_that_message_due_now(queue: tuple[Config, dict[str, str]]) -> None:
    config, ids = queue
    before = time.time()
    code, _, err = cli(config, "queue", "flush", ids["deferred"])
    assert code == 0 and "flushed 1" in err
    [message] = listed(config, "--state", "queued", "--domain", "yahoo.com")
    assert message["id"] == ids["deferred"]
    [r] = message["recipients"]
    assert r["state"] == "queued" and r["attempts"] == 1
    due = datetime.fromisoformat(r["next_attempt_at"]).timestamp()
    assert before - 1 <= due <= time.time() + 1  # due now, not in an hour


def test_hold_and_release_by_id(queue: tuple[Config, dict[str, str]]) -> None:
    config, ids = queue
    assert cli(config, "queue", "hold", ids["news"])[0] == 0
    assert {r["state"] for r in listed(config, "--state", "held")[0]["recipients"]} == {"held"}

    async def claim_everything_due_tomorrow() -> set[str]:
        async with AsyncPostlane(config) as app:  # held deliveries are never claimed
            now = time.time()
            claimed = await app.store.claim_due(
                "w", ALL, limit=100, now=now + 86400, lease_until=now + 86460
            )
            await app.store.hand_back("w", None, now)
            return {m.queue_id for m in claimed}

    assert ids["news"] not in asyncio.run(claim_everything_due_tomorrow())
    assert cli(config, "queue", "release", ids["news"])[0] == 0
    assert listed(config, "--state", "held") == []


def test_bulk_actions_need_ids_or_all(queue: tuple[Config, dict[str, str]]) -> None:
    config, _ = queue
    for verb in ("hold", "release", "delete"):
        code, _, err = cli(config, "queue", verb)
        assert code == 2 and "--all" in err


def test_delete_asks_and_no_changes_nothing(queue: tuple[Config, dict[str, str]]) -> None:
    config, _ids = queue
    before = listed(config)
    code, _, err = cli(config, "queue", "delete", "--all", input="n\n")
    assert code != 0
    assert "delete will touch 4 recipient(s)" in err
    assert "example.net" in err and "deferred" in err  # counts by domain and state shown
    assert listed(config) == before
    # a script with nothing on stdin is told why, and the way on (it printed "Aborted!")
    code, _, err = cli(config, "queue", "delete", "--all", input="")
    assert code == 1 and listed(config) == before
    assert err.splitlines()[-2:] == [
        "Delete 4 recipient(s)? [y/N]: ",
        "postlane: error: no answer came (stdin is not a terminal): add --yes to go ahead",
    ]


def test_export_then_import_restores_content_ids_and_history(
    queue: tuple[Config, dict[str, str]], tmp_path: Path
) -> None:
    config, ids = queue
    export = tmp_path / "deleted.jsonl"
    names = ("queued_high", "news", "deferred")

    async def snapshot() -> dict[str, Any]:
        async with AsyncPostlane(config) as app:
            return {
                name: (await app.content(ids[name]), await app.get(ids[name])) for name in names
            }

    originals = asyncio.run(snapshot())
    code, _, err = cli(config, "queue", "delete", "--all", "--export", str(export), "--yes")
    assert code == 0 and "deleted 4" in err
    assert listed(config) == []
    assert len(export.read_text().splitlines()) == 3
    code, _, err = cli(config, "queue", "import", str(export))
    assert code == 0 and "imported 4" in err
    restored = asyncio.run(snapshot())
    for name, (content, view) in originals.items():
        again_content, again = restored[name]
        assert again_content == content
        assert again.message_id == view.message_id
        assert [r.address for r in again.recipients] == [r.address for r in view.recipients]
        for old, new in zip(view.recipients, again.recipients, strict=True):
            assert [a.text for a in old.history or ()] == [a.text for a in new.history or ()]


@pytest.mark.parametrize(
    "bad",
    [b"not json\n", b'{"format": "postlane-export/1"}\n', b"\xff\xfe\n"],
    ids=["not json", "not a record", "not utf-8"],
)
def test_an_import_with_a_bad_line_imports_nothing(tmp_path: Path, bad: bytes) -> None:
    """Past the first batch of 100 too: every line is checked before anything is stored."""
    config = write_config(tmp_path)

    async def fill() -> None:
        async with AsyncPostlane(config) as app:
            await app.send_many(
                [
                    Message(sender="a@example.com", to=[f"u{i}@example.net"], text=str(i))
                    for i in range(150)
                ]
            )

    asyncio.run(fill())
    export = tmp_path / "deleted.jsonl"
    code, _, _ = cli(config, "queue", "delete", "--all", "--export", str(export), "--yes")
    assert code == 0 and len(export.read_text().splitlines()) == 150
    export.write_bytes(export.read_bytes() + bad)  # good lines first, then a bad one
    code, _, err = cli(config, "queue", "import", str(export))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert "line 151" in lines[0] or "UTF-8" in lines[0], err
    assert listed(config) == []  # not even the good lines


def test_import_from_stdin(queue: tuple[Config, dict[str, str]], tmp_path: Path) -> None:
    config, ids = queue
    export = tmp_path / "deleted.jsonl"
    assert cli(config, "queue", "delete", ids["news"], "--export", str(export), "--yes")[0] == 0
    code, _, err = cli(config, "queue", "import", "-", input=export.read_text())
    assert code == 0 and "imported 2" in err
    assert [m["id"] for m in listed(config, "--sender", "news@example.com")] == [ids["news"]]


def test_partial_delete_by_domain_keeps_the_other_recipients(
    queue: tuple[Config, dict[str, str]], tmp_path: Path
) -> None:
    config, _ids = queue
    code, _, _ = cli(
        config,
        "queue",
        "delete",
        "--all",
        "--domain",
        "example.org",
        "--yes",
        "--export",
        str(tmp_path / "x.jsonl"),
    )
    assert code == 0
    [news] = listed(config, "--sender", "news@example.com")
    assert [r["address"] for r in news["recipients"]] == ["b@example.net"]
    assert cli(config, "queue", "import", str(tmp_path / "x.jsonl"))[0] == 0
    [news] = listed(config, "--sender", "news@example.com")
    assert {r["address"] for r in news["recipients"]} == {"b@example.net", "c@example.org"}


def test_dead_letters_group_identical_failures(queue: tuple[Config, dict[str, str]]) -> None:
    config, ids = queue
    code, out, _ = cli(config, "dlq", "list", "--group", "--json")
    [group] = json.loads(out)
    assert (
        group["count"] == 2 and group["class"] == "hard_bounce" and group["domain"] == "example.net"
    )
    assert "<address>" in group["reply"] and "<id>" in group["reply"]
    code, out, _ = cli(config, "dlq", "list")
    assert code == 0 and "2" in out and "hard_bounce" in out
    rows = json.loads(cli(config, "dlq", "list", "--json")[1])  # the contract: one row each
    assert {r["id"] for r in rows} == {ids["dead1"], ids["dead2"]}
    fields = {
        "id",
        "address",
        "domain",
        "lane",
        "attempts",
        "class",
        "dead_at",
        "last_response",
        "relay",
    }
    assert all(fields <= set(r) for r in rows)
    assert rows[0]["relay"] == "smtp://relay:25"


def test_requeue_gives_a_fresh_start_and_purge_drops(
    queue: tuple[Config, dict[str, str]],
) -> None:
    config, ids = queue
    code, _, err = cli(config, "dlq", "requeue", ids["dead1"])
    assert code == 0 and "requeued 1" in err
    [message] = listed(config, "--recipient", "bounce1@example.net")
    assert message["recipients"][0]["state"] == "queued"
    assert message["recipients"][0]["attempts"] == 0
    code, _, _ = cli(config, "dlq", "purge", "--all", "--class", "hard_bounce", input="y\n")
    assert code == 0
    assert json.loads(cli(config, "dlq", "list", "--json")[1]) == []


def test_requeue_by_selectors_touches_only_what_they_pick(
    queue: tuple[Config, dict[str, str]],
) -> None:
    config, ids = queue

    async def dead_letter_blocked() -> str:
        async with AsyncPostlane(config) as app:
            result = await app.send(sender="a@example.com", to=["c@blocked.example.com"], text="x")
            now = time.time()
            claimed = await app.store.claim_due("w", ALL, limit=100, now=now, lease_until=now + 60)
            block = attempt(ReplyClass.POLICY_BLOCK, 554, "554 5.7.1 listed at a blocklist")
            [message] = [m for m in claimed if m.queue_id == result.id]
            outcomes = [
                Outcome(d.id, RecipientState.DEAD, 1, 0, None, block) for d in message.deliveries
            ]
            await app.store.record("w", outcomes, now)
            await app.store.hand_back("w", None, now)  # the others, untouched
            return result.id

    blocked = asyncio.run(dead_letter_blocked())

    def dead() -> set[str]:
        return {d["id"] for d in json.loads(cli(config, "dlq", "list", "--json")[1])}

    assert dead() == {ids["dead1"], ids["dead2"], blocked}
    code, _, err = cli(config, "dlq", "requeue", "--all", "--domain", "blocked.example.com")
    assert code == 0 and "requeued 1" in err
    assert dead() == {ids["dead1"], ids["dead2"]}
    [message] = listed(config, "--recipient", "c@blocked.example.com")
    assert message["recipients"][0]["state"] == "queued"
    assert message["recipients"][0]["attempts"] == 0
    code, _, err = cli(config, "dlq", "requeue", "--all", "--class", "policy_block")
    assert code == 0 and err.strip() == "nothing to requeue"  # one word, not also "requeued 0"
    code, _, err = cli(
        config,
        "dlq",
        "requeue",
        "--all",
        "--class",
        "hard_bounce",
        "--recipient",
        "bounce2@example.net",
    )
    assert code == 0 and "requeued 1" in err
    assert dead() == {ids["dead1"]}


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list", "--state", "bogus"],
        ["dlq", "list", "--state", "dead"],
        ["dlq", "requeue", "--all", "--state", "dead"],
        ["dlq", "purge", "--all", "--state", "queued", "--yes"],
    ],
)
def test_dead_letter_commands_refuse_state(
    queue: tuple[Config, dict[str, str]], args: list[str]
) -> None:
    """A dead letter is always dead: --state would be ignored, so it is refused."""
    config, ids = queue
    code, _, err = cli(config, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--state" in lines[0], err
    rows = json.loads(cli(config, "dlq", "list", "--json")[1])
    assert {r["id"] for r in rows} == {ids["dead1"], ids["dead2"]}  # nothing changed


def test_stats_shape(queue: tuple[Config, dict[str, str]]) -> None:
    config, _ = queue
    _code, out, _ = cli(config, "stats", "--shape", "--json")
    rows = {r["domain"]: r for r in json.loads(out)}
    assert rows["gmail.com"]["total"] == 1 and rows["gmail.com"]["buckets"]["5m"] == 1
    assert "yahoo.com" in rows
    assert "qshape" in cli(config, "stats", "--shape")[1]
    # scheduled mail is in T and in no age bucket: its own column, so each row adds up (an
    # operator's audit: TOTAL 3403 over buckets adding to 3400)
    send = ("send", "--from", "a@example.com", "--to", "s@later.example", "--text", "x")
    assert cli(config, *send, "--at", "2h")[0] == 0
    _code, out, _ = cli(config, "stats", "--shape", "--json")
    rows = {r["domain"]: r for r in json.loads(out)}
    assert rows["later.example"]["total"] == rows["later.example"]["later"] == 1
    assert all(r["total"] == r["later"] + sum(r["buckets"].values()) for r in rows.values())


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["queue", "hold", "nosuchid"], "no message with id"),
        (["queue", "delete", "nosuchid", "--yes"], "no message with id"),
        (["dlq", "requeue", "nosuchid"], "no message with id"),
        (["queue", "hold", "--all", "--state", "sent"], "does not apply"),
        (["queue", "hold", "--all", "--class", "nonsense"], "'nonsense' is not one of delivered,"),
        (["queue", "hold", "x", "--all"], "not both"),
        (["queue", "import", "/nonexistent/file"], "cannot read"),
    ],
)
def test_bad_ids_and_selectors_are_one_line(
    queue: tuple[Config, dict[str, str]], args: list[str], contains: str
) -> None:
    config, _ = queue
    code, _, err = cli(config, *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and contains in lines[0], err


def test_an_unreachable_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "postlane.toml").write_text('[store]\nurl = "sqlite:////proc/none/q.db"\n')
    config = make_config(tmp_path)
    code, _, err = cli(config, "queue", "list")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "there is no queue at" in err


# -- racing a running worker ---------------------------------------------------------------------


async def run_worker_against(
    peer: SMTPPeer, config: Config, app: AsyncPostlane
) -> tuple[Worker, asyncio.Event, asyncio.Task[None]]:
    worker = Worker.from_config(config, app.store, transport_for(config), wake=app.wake)
    stop = asyncio.Event()
    return worker, stop, asyncio.create_task(worker.run(stop))


async def wait_until(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_holding_mid_delivery_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    config = make_config(
        tmp_path, delivery={"relay": smtp_peer.url, "concurrency": 4, "batch_size": 4}
    )
    smtp_peer.handler.data_delay = 0.02
    async with AsyncPostlane(config) as app:
        await app.send_many(
            [
                Message(sender="a@example.com", to=[f"u{i}@example.net"], text=str(i))
                for i in range(40)
            ]
        )
        _worker, stop, task = await run_worker_against(smtp_peer, config, app)
        await wait_until(lambda: _at_least(smtp_peer, 5))
        await app.act(QueueAction.HOLD, Selector(all=True))
        await wait_until(lambda: _none_sending(app))
        stats = await app.stats()
        held, sent = stats.lanes[Lane.NORMAL].held, stats.sent
        assert held + sent == 40 and held > 0
        assert len(smtp_peer.handler.received) == sent  # held ones were not sent
        await app.act(QueueAction.RELEASE, Selector(all=True))
        await wait_until(lambda: _sent(app, 40))
        stop.set()
        await task
    counts = Counter(smtp_peer.handler.message_ids())
    assert len(counts) == 40 and max(counts.values()) == 1


async def test_deleting_mid_delivery_with_export_then_import_sends_each_once(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    config = make_config(
        tmp_path, delivery={"relay": smtp_peer.url, "concurrency": 4, "batch_size": 4}
    )
    smtp_peer.handler.data_delay = 0.02
    export = tmp_path / "deleted.jsonl"
    async with AsyncPostlane(config) as app:
        await app.send_many(
            [
                Message(sender="a@example.com", to=[f"u{i}@example.net"], text=str(i))
                for i in range(40)
            ]
        )
        _worker, stop, task = await run_worker_against(smtp_peer, config, app)
        await wait_until(lambda: _at_least(smtp_peer, 5))
        with export.open("w") as handle:
            deleted = await app.act(QueueAction.DELETE, Selector(all=True), export=handle)
        assert deleted > 0
        await wait_until(lambda: _none_sending(app))
        with export.open() as handle:
            assert await app.import_(handle) == deleted
        await wait_until(lambda: _sent(app, 40))
        stop.set()
        await task
    counts = Counter(smtp_peer.handler.message_ids())
    assert len(counts) == 40 and max(counts.values()) == 1


async def _at_least(peer: SMTPPeer, n: int) -> bool:
    return len(peer.handler.received) >= n


async def _none_sending(app: AsyncPostlane) -> bool:
    stats = await app.stats()
    return all(stats.lanes[lane].sending == 0 for lane in Lane)


async def _sent(app: AsyncPostlane, n: int) -> bool:
    return (await app.stats()).sent >= n


# -- flush versus a paused destination -----------------------------------------------------------

T0 = 1_800_000_000.0


async def enqueue_routed(app: AsyncPostlane, address: str, destination: str) -> str:
    """Enqueue as an MX lookup at enqueue would: ``destination`` stored with the recipient (a
    custom domain whose MX hosts are a provider's), which no table maps its domain to."""
    prepared = app.prepare(Message(sender="app@example.com", to=[address], text="x"))
    recipients = tuple(dataclasses.replace(r, destination=destination) for r in prepared.recipients)
    [result] = await app.store.enqueue(
        [dataclasses.replace(prepared, recipients=recipients)], app.clock.now()
    )
    return result.id


async def pause(store: Store, destination: str, *, at: float, until: float) -> None:
    """What a worker records when a destination fails: its pause, and its backlog deferred."""
    await store.save_destination_states(
        [DestinationStatus(destination, None, None, until, "3 connection failure(s)", 0, None, at)]
    )
    await store.defer_destination(destination, until, at, f"destination {destination} is paused")


async def recorded(store: Store, destination: str) -> DestinationStatus:
    [status] = [s for s in await store.destination_states() if s.destination == destination]
    return status


async def recipient(app: AsyncPostlane, queue_id: str) -> Any:
    [r] = (await app.get(queue_id, history=False)).recipients
    return r


def test_flush_by_domain_lifts_the_pause_of_the_destination_stored_at_enqueue(
    tmp_path: Path,
) -> None:
    """corp.example.net reached google through its MX hosts at enqueue: flushing that domain
    lifts google's pause (the table alone would have named the domain), and the worker
    delivers."""
    config = write_config(tmp_path)
    now = time.time()

    async def setup() -> str:
        async with AsyncPostlane(config) as app:
            queue_id = await enqueue_routed(app, "ada@corp.example.net", "google")
            await pause(app.store, "google", at=now, until=now + 600)
            assert (await recipient(app, queue_id)).next_attempt_at == now + 600
            return queue_id

    queue_id = asyncio.run(setup())
    code, _, err = cli(config, "queue", "flush", "--domain", "corp.example.net")
    assert code == 0 and "flushed" in err, err

    async def deliver() -> tuple[DestinationStatus, Any, int]:
        async with AsyncPostlane(config) as app:
            status = await recorded(app.store, "google")
            transport = transport_for(config)
            worker = Worker.from_config(config, app.store, transport)
            try:
                await worker.run_until_idle()
            finally:
                await transport.close()
            return status, await recipient(app, queue_id), worker.sent

    status, delivered, sent = asyncio.run(deliver())
    assert status.paused_until is None and status.reason == LIFTED
    assert sent == 1 and delivered.state is RecipientState.SENT


async def test_a_flush_lifts_only_the_destinations_of_what_it_selects(
    store: Store, tmp_path: Path
) -> None:
    clock = FakeClock(T0)
    app = AsyncPostlane(make_config(tmp_path), store=store, clock=clock)  # opened by the fixture
    ada = await enqueue_routed(app, "ada@corp.example.net", "google")
    bob = await enqueue_routed(app, "bob@other.example.org", "other.example.org")
    for destination in ("google", "other.example.org"):
        await pause(store, destination, at=T0 - 10, until=T0 + 600)
    assert await app.act(QueueAction.FLUSH, Selector(domains=("corp.example.net",))) == 1
    assert (await recorded(store, "google")).paused_until is None
    assert (await recorded(store, "other.example.org")).paused_until == T0 + 600
    assert (await recipient(app, ada)).next_attempt_at == T0
    assert (await recipient(app, bob)).next_attempt_at == T0 + 600


@pytest.mark.parametrize(
    ("relay", "shared"),
    [("smtp://127.0.0.1:2", "relay"), ("ses://AKIAEXAMPLE:secret@eu-west-1", "ses")],
)
async def test_a_flush_of_some_mail_lifts_the_pause_of_the_relay_it_goes_through(
    store: Store, tmp_path: Path, relay: str, shared: str
) -> None:
    """With a relay (or a provider's API), every delivery also goes through it, and its pause
    (``relay``, ``ses``) is what holds the mail back: flushing one message lifts it, as the
    contract's "lift the pause on their destinations" means; another destination's stays."""
    clock = FakeClock(T0)
    config = make_config(tmp_path, delivery={"relay": relay})
    app = AsyncPostlane(config, store=store, clock=clock)  # opened by the fixture
    ada = await enqueue_routed(app, "ada@example.org", "example.org")
    for destination in (shared, "elsewhere.example"):
        await pause(store, destination, at=T0 - 10, until=T0 + 600)
    assert await app.act(QueueAction.FLUSH, Selector(ids=(ada,))) == 1
    assert (await recorded(store, shared)).paused_until is None
    assert (await recorded(store, "elsewhere.example")).paused_until == T0 + 600


async def test_lifting_a_relays_pause_calls_back_the_mail_it_sent_back_to_wait(
    store: Store, tmp_path: Path
) -> None:
    """The relay's pause sent mail back to wait under its recipients' destinations, not the
    relay's name: lifting the relay (the dashboard's Lift pause) makes that mail due."""
    from postlane.gate import WAITING_FOR_DESTINATION

    clock = FakeClock(T0)
    config = make_config(tmp_path, delivery={"relay": "smtp://127.0.0.1:2"})
    app = AsyncPostlane(config, store=store, clock=clock)  # opened by the fixture
    ada = await enqueue_routed(app, "ada@down.example", "down.example")
    [claimed] = await store.claim_due(
        "w1", [(Lane.NORMAL, 10)], limit=10, now=T0, lease_until=T0 + 60
    )
    [delivery] = claimed.deliveries
    await store.defer_unattempted(
        "w1", [Deferral(delivery.id, T0 + 600)], T0, WAITING_FOR_DESTINATION
    )
    await pause(store, "relay", at=T0, until=T0 + 600)
    await app.lift_destinations(["relay"])
    assert (await recorded(store, "relay")).paused_until is None
    assert (await recipient(app, ada)).next_attempt_at == T0


@pytest.mark.parametrize("routed", [False, True])
async def test_while_the_relay_is_paused_the_queue_shows_its_mail_due_at_the_pauses_end(
    store: Store, tmp_path: Path, routed: bool
) -> None:
    """An operator's audit: with the relay every delivery goes through paused, nothing is
    claimed, and `queue list` showed next attempts long past, `stats` the mail as ready. The
    views now say when it goes (mail scheduled after the pause keeps its time); a lift shows
    the mail due at once. With routes there is no one relay: each message's own admission
    sends it back to wait, so nothing is changed in the views."""
    clock = FakeClock(T0)
    routes = [{"relay": "smtp://127.0.0.1:3", "lane": ["high"]}] if routed else []
    config = make_config(tmp_path, delivery={"relay": "smtp://127.0.0.1:2"}, routes=routes)
    app = AsyncPostlane(config, store=store, clock=clock)  # opened by the fixture
    ada = await enqueue_routed(app, "ada@down.example", "down.example")
    later = await app.send(sender="app@example.com", to=["bob@x.example"], text="x",
                           send_at=T0 + 900)  # fmt: skip
    await store.save_destination_states(
        [DestinationStatus("relay", None, None, T0 + 600, "3 connection failure(s)", 0, None, T0)]
    )
    shown = await recipient(app, ada)
    lane = (await app.stats()).lanes[Lane.NORMAL]
    if routed:
        assert (shown.next_attempt_at, shown.reason) == (T0, None)
        assert (lane.ready, lane.deferred) == (1, 0)
        return
    assert (shown.next_attempt_at, shown.state, shown.reason) == (
        T0 + 600, RecipientState.DEFERRED, "destination relay is paused",
    )  # fmt: skip
    assert [r.next_attempt_at for m in await app.messages() for r in m.recipients] == [
        T0 + 600, T0 + 900,
    ]  # fmt: skip
    assert (await recipient(app, later.id)).next_attempt_at == T0 + 900
    assert (lane.ready, lane.deferred, lane.scheduled) == (0, 1, 1)
    await app.lift_destinations(["relay"])  # the dashboard's Lift pause
    assert (await recipient(app, ada)).next_attempt_at == T0
    assert (await app.stats()).lanes[Lane.NORMAL].ready == 1


async def test_while_the_relay_is_paused_a_state_selects_what_the_queue_shows(
    store: Store, tmp_path: Path
) -> None:
    """An operator audit: with the relay paused, `queue list` showed 301 recipients deferred
    but `--state deferred` selected 49 (the rest being queued in the store, due before the
    pause's end), `--state queued` 251 rows each shown deferred, and a `delete --state
    deferred` offered 49 with a table saying queued. States are read as the views show them."""
    clock = FakeClock(T0)
    config = make_config(tmp_path, delivery={"relay": "smtp://127.0.0.1:2"})
    app = AsyncPostlane(config, store=store, clock=clock)  # opened by the fixture
    ada = (await app.send(sender="app@example.com", to=["ada@x.example"], text="x")).id
    later = await app.send(sender="app@example.com", to=["bob@x.example"], text="x",
                           send_at=T0 + 900)  # fmt: skip
    await store.save_destination_states(
        [DestinationStatus("relay", None, None, T0 + 600, "3 connection failure(s)", 0, None, T0)]
    )
    deferred = Selector(all=True, states=(RecipientState.DEFERRED,))
    queued = Selector(all=True, states=(RecipientState.QUEUED,))
    assert [m.id for m in await app.messages(deferred)] == [ada]
    assert [m.id for m in await app.messages(queued)] == [later.id]
    assert [m.id for m in (await app.message_page(deferred)).items] == [ada]
    [count] = await app.summarize(QueueAction.DELETE, deferred)
    assert (count.state, count.count) == (RecipientState.DEFERRED, 1)
    counts = {c.state: c.count for c in await app.summarize(QueueAction.HOLD, Selector(all=True))}
    assert counts == {RecipientState.DEFERRED: 1, RecipientState.QUEUED: 1}
    assert await app.act(QueueAction.DELETE, deferred) == 1
    assert [m.id for m in await app.messages()] == [later.id]


class OperatorRacesTheWorker:
    """The store as a worker sees it, while an operator's flush from another process commits
    at one chosen moment: just before the worker's next claim, while it defers a paused
    destination's backlog (after it last read the destination's recorded state), or just
    before it hands back, to wait for the end of the pause, what it had claimed."""

    def __init__(self, store: Store, moment: str, flush: Any) -> None:
        self._store = store
        self._moment = moment
        self._flush = flush

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _maybe_flush(self, moment: str) -> None:
        if self._moment == moment and self._flush is not None:
            flush, self._flush = self._flush, None
            await flush()

    async def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        await self._maybe_flush("before the claim")
        return await self._store.claim_due(*args, **kwargs)

    async def defer_destination(self, *args: Any, **kwargs: Any) -> Any:
        await self._maybe_flush("while deferring")
        return await self._store.defer_destination(*args, **kwargs)

    async def defer_unattempted(self, *args: Any, **kwargs: Any) -> Any:
        await self._maybe_flush("while handing back")
        return await self._store.defer_unattempted(*args, **kwargs)


@pytest.mark.parametrize("moment", ["before the claim", "while deferring", "while handing back"])
async def test_a_worker_holding_a_lifted_pause_does_not_push_flushed_mail_back(
    tmp_path: Path, moment: str
) -> None:
    """The worker adopted google's pause; an operator lifts it from another process before
    the worker adopts the lift. What the flush made due is delivered now, not at the end of the
    old pause (and mail claimed meanwhile goes too). "While handing back": the worker had
    claimed ``fresh`` and read google's recorded state (still paused) when the lift
    committed; the lift's call-back of waiting mail passed over ``fresh`` (leased), and the
    worker then handed it back to wait for the old pause's end (a scale audit's 4%)."""
    config = make_config(tmp_path)
    clock = FakeClock(T0)
    async with (
        AsyncPostlane(config, clock=clock) as app,
        AsyncPostlane(config, clock=clock) as operator,
    ):
        backlog = await enqueue_routed(app, "ada@corp.example.net", "google")
        await pause(app.store, "google", at=T0 - 10, until=T0 + 600)
        fresh = await enqueue_routed(app, "bob@gmail.com", "google")  # due now: claimed first
        racing = OperatorRacesTheWorker(
            app.store,
            moment,
            lambda: operator.act(QueueAction.FLUSH, Selector(domains=("corp.example.net",))),
        )
        transport = transport_for(config)
        worker = Worker.from_config(config, racing, transport, clock=clock)  # type: ignore[arg-type]
        try:
            await worker.run_until_idle()
        finally:
            await transport.close()
        assert racing._flush is None  # the operator's flush did run at that moment
        assert (await recipient(app, backlog)).state is RecipientState.SENT
        assert (await recipient(app, fresh)).state is RecipientState.SENT
        assert worker.sent == 2
        assert worker.throttle.paused_until("google", clock.now()) is None


async def test_a_burst_worker_holding_a_lifted_slow_down_sends_what_it_claims_after_the_lift(
    tmp_path: Path,
) -> None:
    """The worker adopted slow.example's slowed rate (0.5/s); an operator's flush lifts it from
    another process just before the worker's claim. What the worker would space out at the old
    rate goes now: the store makes those deferrals due (decided before a lift it records), and
    the worker adopts the lift instead of claiming them back and deferring them again."""
    config = make_config(tmp_path)
    clock = FakeClock(T0)
    async with (
        AsyncPostlane(config, clock=clock) as app,
        AsyncPostlane(config, clock=clock) as operator,
    ):
        ids = [await enqueue_routed(app, f"u{i}@slow.example", "slow.example") for i in range(5)]
        slowed = DestinationStatus("slow.example", 0.5, None, None, "throttled", updated_at=T0)
        await app.store.save_destination_states([slowed])
        racing = OperatorRacesTheWorker(
            app.store,
            "before the claim",
            lambda: operator.act(QueueAction.FLUSH, Selector(domains=("slow.example",))),
        )
        transport = transport_for(config)
        worker = Worker.from_config(config, racing, transport, clock=clock)  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(worker.run_until_idle(), timeout=30)
        finally:
            await transport.close()
        assert racing._flush is None
        assert [(await recipient(app, i)).state for i in ids] == [RecipientState.SENT] * 5


# -- requeue of suppressed addresses (new user's item 1) ---------------------------------------


def test_issue_17_1_requeue_of_a_suppressed_address_is_refused_naming_it_and_the_way_out(
    queue: tuple[Config, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard bounce's address is on the suppression list: requeued as it is, the worker would
    mark it suppressed with no attempt, and it would leave the dead letters without a word."""
    config, ids = queue
    assert cli(config, "suppress", "add", "bounce1@example.net")[0] == 0
    code, _, err = cli(config, "dlq", "requeue", "--all", "--class", "hard_bounce")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert "bounce1@example.net" in lines[0] and "bounce2@example.net" not in lines[0]
    assert "--unsuppress" in lines[0] and "suppress remove" in lines[0]
    dead = {d["id"] for d in json.loads(cli(config, "dlq", "list", "--json")[1])}
    assert dead == {ids["dead1"], ids["dead2"]}  # nothing was requeued, the other neither

    # at a terminal, lifting a suppression is shown and asked first, as a purge is (an
    # operator audit: 200 suppressions went at once); answered no, nothing changes. (A script
    # that says --unsuppress is not asked.)
    requeue = ("dlq", "requeue", "--all", "--class", "hard_bounce", "--unsuppress")
    monkeypatch.setattr(actions, "interactive", lambda: True)
    code, _, err = cli(config, *requeue, input="n\n")
    assert code == 1
    assert "--unsuppress takes 1 address(es) off the suppression list: bounce1@example.net" in err
    assert "Requeue 2 recipient(s) and lift the suppression of 1 address(es)?" in err
    assert [e["address"] for e in json.loads(cli(config, "suppress", "list", "--json")[1])] == [
        "bounce1@example.net"
    ]
    monkeypatch.undo()  # a script (stdin not a terminal) that says --unsuppress means it
    code, _, err = cli(config, *requeue)
    assert code == 0, err
    assert "--unsuppress takes" not in err
    assert "bounce1@example.net: removed from the suppression list" in err
    assert "requeued 2 recipient(s)" in err
    assert json.loads(cli(config, "suppress", "list", "--json")[1]) == []
    [message] = listed(config, "--recipient", "bounce1@example.net")
    assert message["recipients"][0]["state"] == "queued"


async def test_issue_17_1_the_requeue_of_the_python_api_says_what_will_happen(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """AsyncPostlane.requeue: what the CLI and the HTTP API both call."""
    from postlane.app import Requeued
    from postlane.errors import SuppressedRecipients

    config, ids = queue
    async with AsyncPostlane(config) as app:
        await app.suppress("bounce2@example.net")
        selector = Selector(all=True)
        with pytest.raises(SuppressedRecipients) as refused:
            await app.requeue(selector)
        assert refused.value.addresses == ("bounce2@example.net",)
        assert "bounce2@example.net" in refused.value.message
        assert len(await app.dead_letters()) == 2
        done = await app.requeue(Selector(ids=(ids["dead1"],)))  # not suppressed: requeued
        assert done == Requeued(1, ())
        done = await app.requeue(selector, unsuppress=True)
        assert done == Requeued(1, ("bounce2@example.net",))
        assert await app.suppressions() == []
        assert await app.dead_letters() == []


async def test_a_requeue_is_refused_only_for_an_entry_that_stops_the_dead_letters_lane(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """An unsubscribe from low-lane mail does not stop a normal-lane dead letter's requeue, and
    is not lifted by one (dead1 and dead2 are normal-lane mail)."""
    from postlane.app import Requeued
    from postlane.errors import SuppressedRecipients

    config, ids = queue
    async with AsyncPostlane(config) as app:
        await app.suppress("bounce2@example.net", reason="unsubscribe", lanes=["low"])
        await app.suppress("bounce1@example.net", lanes=["normal"])
        assert await app.suppressed_dead_letters(Selector(all=True)) == ["bounce1@example.net"]
        with pytest.raises(SuppressedRecipients):
            await app.requeue(Selector(ids=(ids["dead1"],)))
        assert await app.requeue(Selector(ids=(ids["dead2"],))) == Requeued(1, ())
        assert await app.requeue(Selector(all=True), unsuppress=True) == Requeued(
            1, ("bounce1@example.net",)
        )
        [kept] = await app.suppressions()
        assert (kept.address, kept.lanes) == ("bounce2@example.net", (Lane.LOW,))


async def test_a_requeue_that_lifts_a_bounce_leaves_the_recipients_unsubscribe(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """The 3 a.m. case: a wave of mistaken hard bounces, requeued with --unsuppress. Each
    address's bounce is lifted; its unsubscribe from the bulk lane stays (it was removed with
    the bounce: the recipient got the newsletters they had left)."""
    from postlane.app import Requeued

    config, _ids = queue
    async with AsyncPostlane(config) as app:
        await app.suppress("bounce1@example.net", reason="unsubscribe", lanes=["low"])
        await app.suppress("bounce1@example.net", reason="hard_bounce")
        done = await app.requeue(Selector(all=True), unsuppress=True)
        assert done == Requeued(2, ("bounce1@example.net",))
        [kept] = await app.suppressions()
        assert (kept.address, kept.reason, kept.lanes) == (
            "bounce1@example.net",
            "unsubscribe",
            (Lane.LOW,),
        )


async def test_a_requeue_sees_a_complaint_about_its_senders_mail(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """A dead letter whose recipient complained about its sender's mail (an entry for that
    sender domain) was requeued without a word, then marked suppressed by the worker, never
    tried: the requeue's check looked at entries for every sender only. It is refused, naming
    the address; with --unsuppress that complaint is lifted; another domain's complaint stays."""
    from postlane.app import Requeued
    from postlane.errors import SuppressedRecipients

    config, ids = queue
    async with AsyncPostlane(config) as app:  # dead1 and dead2 come from app@example.com
        await app.suppress("bounce1@example.net", reason="complaint", scope="example.com")
        await app.suppress("bounce2@example.net", reason="complaint", scope="other.example")
        assert await app.suppressed_dead_letters(Selector(all=True)) == ["bounce1@example.net"]
        with pytest.raises(SuppressedRecipients):
            await app.requeue(Selector(ids=(ids["dead1"],)))
        assert await app.requeue(Selector(all=True), unsuppress=True) == Requeued(
            2, ("bounce1@example.net",)
        )
        [kept] = await app.suppressions()
        assert (kept.address, kept.scope) == ("bounce2@example.net", "other.example")


# -- export files (audit 8) and CLI polish (new user's item 10) ---------------------------------


def test_finding_8_export_files_are_readable_by_their_owner_only(
    queue: tuple[Config, dict[str, str]], tmp_path: Path
) -> None:
    config, ids = queue
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    old.write_text("")
    old.chmod(0o644)
    for export, name in ((new, "news"), (old, "deferred")):
        code, _, err = cli(config, "queue", "delete", ids[name], "--export", str(export), "--yes")
        assert code == 0, err
        assert export.stat().st_mode & 0o777 == 0o600
        assert export.read_text().strip()


def test_issue_17_10_nothing_to_flush_is_said_once(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    async def create_the_queue() -> None:
        async with AsyncPostlane(config):
            pass

    asyncio.run(create_the_queue())
    code, out, err = cli(config, "queue", "flush")
    assert code == 0 and out == "" and err == "nothing to flush\n"


def test_a_flush_of_held_mail_says_it_is_held_and_how_to_send_it(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """An operator's audit: `queue flush ID` of a held message said "nothing to flush", rc 0;
    and a delete that matched nothing printed an empty table first."""
    config, ids = queue
    assert cli(config, "queue", "hold", ids["news"])[0] == 0
    code, out, err = cli(config, "queue", "flush", ids["news"])
    assert code == 0 and out == ""
    assert err == (
        "nothing to flush: 2 recipient(s) of the selection are held (postlane queue release "
        "sends them)\n"
    )
    code, _, err = cli(config, "queue", "delete", "--all", "--domain", "nosuch.example")
    assert code == 0 and err == "nothing to delete\n"


def test_issue_17_10_piped_listings_are_neither_padded_nor_wrapped(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """A pipe gets one line per row: no trailing spaces to the table's (or 250 columns')
    width, no header or reply starting with a stray space."""
    config, _ids = queue

    async def refuse_a_connection() -> str:
        async with AsyncPostlane(config) as app:
            result = await app.send(sender="a@example.com", to=["z@example.com"], text="x")
            now = time.time()
            claimed = await app.store.claim_due("w", ALL, limit=100, now=now, lease_until=now + 60)
            [message] = [m for m in claimed if m.queue_id == result.id]
            refused = AttemptRecord(
                now,
                ReplyClass.CONNECTION,
                None,
                None,
                "smtp://relay:25: connection refused " + "x" * 300,
                "smtp://relay:25",
                "x",
                5,
            )
            outcomes = [
                Outcome(d.id, RecipientState.DEFERRED, 0, 1, now + 60, refused)
                for d in message.deliveries
            ]
            await app.store.record("w", outcomes, now)
            await app.store.hand_back("w", None, now)
            return result.id

    refused = asyncio.run(refuse_a_connection())
    outputs = {}
    for args in (
        ("queue", "list"),
        ("queue", "show", refused),
        ("dlq", "list"),
        ("dlq", "list", "--rows"),
        ("suppress", "list"),
        ("stats",),
        ("stats", "--shape"),
    ):
        code, out, err = cli(config, *args)
        assert code == 0, err
        outputs[args] = out
        for line in out.splitlines():
            assert line == line.rstrip(), (args, line)
        first = out.splitlines()[0]
        assert first == first.lstrip(), (args, first)
    listing = outputs[("queue", "list")]
    assert "(smtp://relay:25: connection refused" in listing and "( smtp" not in listing
    headers = [
        line for line in outputs[("queue", "show", refused)].splitlines() if "  class  " in line
    ]
    assert headers and all(line.startswith("    at ") for line in headers), headers


async def defer(app: AsyncPostlane, queue_id: str, until: float) -> None:
    """What a worker records for a 451: the recipient ``deferred`` until ``until``."""
    now = app.clock.now()
    claimed = await app.store.claim_due("w", ALL, limit=100, now=now, lease_until=now + 60)
    [message] = [m for m in claimed if m.queue_id == queue_id]
    reply = AttemptRecord(now, ReplyClass.TEMPORARY, 451, None, "451 4.3.0 later", "mx", "x", 5)
    outcomes = [
        Outcome(d.id, RecipientState.DEFERRED, 1, 0, until, reply) for d in message.deliveries
    ]
    await app.store.record("w", outcomes, now)
    await app.store.hand_back("w", None, now)


async def test_a_flush_of_deferred_mail_counts_what_it_made_due_when_it_lifts_a_pause(
    store: Store, tmp_path: Path
) -> None:
    """``queue flush --state deferred`` of a paused destination: the lift must not turn the
    deferred mail queued before the flush reads it (the flush then said 0 while it sent)."""
    clock = FakeClock(T0)
    app = AsyncPostlane(make_config(tmp_path), store=store, clock=clock)  # opened by the fixture
    ada = await enqueue_routed(app, "ada@corp.example.net", "google")
    await defer(app, ada, T0 + 300)
    await pause(store, "google", at=T0, until=T0 + 600)
    deferred = Selector(states=(RecipientState.DEFERRED,), all=True)
    assert await app.act(QueueAction.FLUSH, deferred) == 1
    assert (await recorded(store, "google")).paused_until is None
    assert (await recipient(app, ada)).next_attempt_at == T0


async def test_lifting_a_pause_leaves_scheduled_mail_for_its_time(
    store: Store, tmp_path: Path
) -> None:
    """A destination's pause pushed back its waiting mail, scheduled mail too; lifting the pause
    (a flush, the dashboard's Lift pause) makes due what was due, and scheduled mail waits for
    its own time, not the end of the pause: a 3 a.m. flush must not send tomorrow's campaign."""
    clock = FakeClock(T0)
    app = AsyncPostlane(make_config(tmp_path), store=store, clock=clock)  # opened by the fixture
    now_mail = await app.send(sender="a@example.com", to=["ada@example.net"], text="x")
    soon = await app.send(
        sender="a@example.com", to=["bob@example.net"], text="x", send_at=T0 + 300
    )
    tomorrow = await app.send(
        sender="a@example.com", to=["cy@example.net"], text="x", send_at=T0 + 86400
    )
    await pause(store, "example.net", at=T0, until=T0 + 600)
    assert (await recipient(app, soon.id)).next_attempt_at == T0 + 600
    await clock.advance(60)
    assert await app.act(QueueAction.FLUSH, Selector(all=True)) == 1
    assert (await recorded(store, "example.net")).paused_until is None
    assert (await recipient(app, now_mail.id)).next_attempt_at == T0 + 60
    assert (await recipient(app, soon.id)).next_attempt_at == T0 + 300
    assert (await recipient(app, tomorrow.id)).next_attempt_at == T0 + 86400

    await pause(store, "example.net", at=T0 + 60, until=T0 + 600)
    await app.lift_destinations(["example.net"])  # the dashboard's Lift pause
    assert (await recipient(app, soon.id)).next_attempt_at == T0 + 300
    assert (await recipient(app, tomorrow.id)).next_attempt_at == T0 + 86400


async def test_a_flush_of_one_message_leaves_the_rest_of_its_destination_to_its_schedule(
    store: Store, tmp_path: Path
) -> None:
    """``queue flush ID`` (``postqueue -i``) retries that message; the other deferred mail of
    its destination keeps its own retry times (an audit saw 392 recipients go for one)."""
    clock = FakeClock(T0)
    app = AsyncPostlane(make_config(tmp_path), store=store, clock=clock)  # opened by the fixture
    mine = await enqueue_routed(app, "ada@yahoo.com", "yahoo.com")
    others = [await enqueue_routed(app, f"u{i}@yahoo.com", "yahoo.com") for i in range(3)]
    for queue_id in (mine, *others):
        await defer(app, queue_id, T0 + 1200)
    assert await app.act(QueueAction.FLUSH, Selector(ids=(mine,))) == 1
    assert (await recipient(app, mine)).next_attempt_at == T0
    assert [(await recipient(app, q)).next_attempt_at for q in others] == [T0 + 1200] * 3

    # paused: the lift calls back the backlog the pause pushed to its end, not the mail whose
    # own retry comes after the pause would have ended
    backlog = await enqueue_routed(app, "bob@yahoo.com", "yahoo.com")
    await pause(store, "yahoo.com", at=T0, until=T0 + 900)
    assert (await recipient(app, backlog)).next_attempt_at == T0 + 900
    assert await app.act(QueueAction.FLUSH, Selector(ids=(others[0],))) == 1
    assert (await recipient(app, backlog)).next_attempt_at == T0
    assert (await recipient(app, others[0])).next_attempt_at == T0
    assert [(await recipient(app, q)).next_attempt_at for q in others[1:]] == [T0 + 1200] * 2


async def test_stats_show_a_destinations_configured_limits(store: Store, tmp_path: Path) -> None:
    """The store keeps what changed a destination's limits; its configured ones come from the
    configuration: stats and postlane_destination_rate showed "no limit" (+Inf) for a
    destination limited to 20/s (a fleet audit)."""
    clock = FakeClock(T0)
    config = make_config(
        tmp_path, destinations={"limited.example.net": {"rate": 20, "concurrency": 3}}
    )
    app = AsyncPostlane(config, store=store, clock=clock)  # opened by the fixture
    await pause(store, "limited.example.net", at=T0, until=T0 + 600)
    [status] = [
        d for d in (await app.stats()).destinations if d.destination == "limited.example.net"
    ]
    assert (status.rate, status.configured_rate, status.concurrency) == (20, 20, 3)
    assert status.paused_until == T0 + 600


async def test_stats_list_a_destination_held_at_its_configured_rate(
    store: Store, tmp_path: Path
) -> None:
    """An operator audit limited ok.example to 10/s and queued 1,000 for it: `stats` said
    "deferred 385" and listed no destination (nothing had slowed or paused it, so nothing was
    recorded), and postlane_destination_rate had no series for it."""
    from postlane.metrics import Metrics

    clock = FakeClock(T0)
    config = make_config(
        tmp_path,
        destinations={
            "ok.example": {"rate": 10, "concurrency": 4},
            "capped.example": {"concurrency": 2},
            "default": {"rate": 50},
        },
    )
    app = AsyncPostlane(config, store=store, clock=clock)  # opened by the fixture
    listed = {d.destination: d for d in (await app.stats()).destinations}
    assert set(listed) == {"ok.example", "capped.example"}  # not the default: no name
    ok = listed["ok.example"]
    assert (ok.rate, ok.configured_rate, ok.concurrency, ok.paused_until) == (10, 10, 4, None)
    assert (listed["capped.example"].rate, listed["capped.example"].concurrency) == (None, 2)
    metrics = Metrics(app)
    await metrics.refresh()
    rate = metrics.registry.get_sample_value(
        "postlane_destination_rate", {"destination": "ok.example"}
    )
    assert rate == 10


async def test_events_of_a_rare_type_are_found_past_a_page_of_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale audit asked `postlane events --type dead` with 120,000 dead events behind 1.4M
    others: "No events" (a typed page looks at a slice of the log, and the table dropped the
    cursor to read on). The command reads on until it finds some or reaches the end."""
    from postlane import events as events_module

    monkeypatch.setattr(events_module, "SCAN_LIMIT", 1)  # one batch of 500 per page
    config = write_config(tmp_path)
    async with AsyncPostlane(config) as app:
        await app.send_many(
            [Message(sender="a@x.example", to=[f"u{n}@y.example"], text="x") for n in range(600)]
        )
        now = time.time()
        [m] = await app.store.claim_due("w", ALL, limit=1, now=now, lease_until=now + 60)
        fail = AttemptRecord(now, ReplyClass.POLICY_BLOCK, 554, "5.7.1", "blocked", "r", "d", 1)
        await app.store.record(
            "w", [Outcome(m.deliveries[0].id, RecipientState.DEAD, 1, 0, None, fail)], now
        )
    code, out, err = await asyncio.to_thread(cli, config, "events", "--type", "dead")
    assert code == 0, err
    assert " dead " in out and "No events" not in err
    code, out, err = await asyncio.to_thread(cli, config, "events", "--type", "bounced")
    assert code == 0 and "No events" in err and out == ""  # the end of the log: nothing more


async def test_suppress_list_reads_past_the_listing_cap_and_says_when_more_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale audit listed 20,000 suppressions with --limit 15000 (the help allows 100,000):
    10,000 came back (the cap of other listings), without the note listings print when more
    match. Here the listings' cap is 10, to keep the list short."""
    from postlane import app as app_module

    monkeypatch.setattr(app_module, "MAX_LIMIT", 10)
    config = write_config(tmp_path)
    async with AsyncPostlane(config) as app:
        for n in range(15):
            entry = Suppression(f"u{n}@gone.example", float(n), "operator", "manual")
            assert await app.store.add_suppression(entry)
    code, out, err = await asyncio.to_thread(
        cli, config, "suppress", "list", "--limit", "12", "--json"
    )
    assert code == 0, err
    assert len(json.loads(out)) == 12
    assert "the first 12 entries are shown; more match" in err


async def test_a_requeue_that_lifts_suppressions_stopped_half_way_lifted_only_what_it_requeued(
    queue: tuple[Config, dict[str, str]],
) -> None:
    """A scale audit stopped `dlq requeue --all --unsuppress` with Ctrl-C after 10 s: every
    suppression was gone (20,000 hard bounces) and nothing was requeued, because all were
    lifted first. Now a slice's suppressions are lifted with that slice's requeue."""
    config, ids = queue

    class Stopped(Exception):
        pass

    def stop_after_the_first_slice(done: int) -> None:
        raise Stopped  # as a Ctrl-C between two slices

    async with AsyncPostlane(config) as app:
        for address in ("bounce1@example.net", "bounce2@example.net"):
            await app.suppress(address)
        said: list[str] = []
        with pytest.raises(Stopped):
            await app.requeue(
                Selector(all=True, classes=(ReplyClass.HARD_BOUNCE,)),
                unsuppress=True,
                progress=stop_after_the_first_slice,
                unsuppressed=said.append,
                slice_size=1,
            )
        left = [s.address for s in await app.suppressions()]
        dead = {d.id for d in await app.dead_letters()}
    assert said == ["bounce1@example.net"]  # told as it happened
    assert left == ["bounce2@example.net"]  # the second slice's: not requeued, still listed
    assert dead == {ids["dead2"]}


async def test_an_expired_dead_letter_says_expired_with_its_last_reply(tmp_path: Path) -> None:
    """A day-one audit: a code greylisted once, then past its expires_at, was listed by `dlq
    list` as the greylisting reply, class temporary, as if it had failed; only --json said
    expired."""
    config = write_config(tmp_path)
    greylisted = "Recipient address rejected: Greylisted"
    async with AsyncPostlane(config) as app:
        code = await app.send(
            sender="app@example.com",
            to=["ada@example.net"],
            text="123456",
            expires_at=time.time() + 600,
        )
        now = time.time()
        [claimed] = await app.store.claim_due("w", ALL, limit=10, now=now, lease_until=now + 60)
        [d] = claimed.deliveries
        deferral = attempt(ReplyClass.TEMPORARY, 450, greylisted)
        outcome = Outcome(d.id, RecipientState.DEFERRED, 1, 0, now + 900, deferral)
        await app.store.record("w", [outcome], now)
        assert await app.store.expire_due(now + 601) == 1
        [group] = await app.dead_groups(Selector(all=True), limit=10)
        assert (group.reply, group.code, group.count) == ("expired", None, 1)
    status, out, err = await asyncio.to_thread(cli, config, "dlq", "list")
    assert status == 0, err
    assert "expired" in out and "Greylisted" not in out
    status, out, err = await asyncio.to_thread(cli, config, "dlq", "list", "--rows")
    assert status == 0, err
    assert code.id in out and "expired (last reply: 450 Recipient address" in " ".join(out.split())


def test_listings_show_brackets_as_they_are(tmp_path: Path) -> None:
    """An audit: `feedback list` showed "not applied ( match_message_id is off)" and `suppress
    list` "see  42": Rich read [bounces] and [ticket] in the cells as markup and dropped them."""
    config = write_config(tmp_path)
    assert cli(config, "migrate")[0] == 0
    code, _, err = cli(
        config, "suppress", "add", "ada@example.net", "--detail", "see [ticket] 42 [b]"
    )
    assert code == 0, err
    code, out, err = cli(config, "suppress", "list")
    assert code == 0, err
    assert "see [ticket] 42 [b]" in out
