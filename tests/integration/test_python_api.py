"""The Python API as applications use it: the sync `Postlane` from many threads (a Django view),
the async `AsyncPostlane` from asyncio code, and both on one store."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import postlane
from postlane.errors import NotFound, ValidationError
from tests.conftest import make_config


def test_the_sync_api_is_safe_from_many_threads(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with postlane.Postlane(config) as mail:

        def send(i: int) -> str:
            return mail.send(sender="app@example.com", to=[f"u{i}@example.net"], text=str(i)).id

        with ThreadPoolExecutor(20) as pool:
            ids = list(pool.map(send, range(200)))
        assert len(set(ids)) == 200
        assert len(mail.messages(limit=1000)) == 200
        assert mail.stats().lanes[postlane.Lane.NORMAL].ready == 200


def test_an_idempotency_key_holds_across_threads(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with postlane.Postlane(config) as mail:
        barrier = threading.Barrier(16)

        def send(_: int) -> tuple[str, bool]:
            barrier.wait()
            result = mail.send(
                sender="a@example.com", to=["b@example.net"], text="x", idempotency_key="k"
            )
            return result.id, result.duplicate

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, range(16)))
        assert len({i for i, _ in results}) == 1
        assert sum(not duplicate for _, duplicate in results) == 1


def test_the_sync_api_works_where_an_event_loop_runs(tmp_path: Path) -> None:
    """A sync call from code that runs inside an event loop (an async framework calling a
    sync helper) does not collide with that loop."""
    config = make_config(tmp_path)

    async def inside_a_loop() -> str:
        with postlane.Postlane(config) as mail:
            return mail.send(sender="a@example.com", to=["b@example.net"], text="x").id

    assert asyncio.run(inside_a_loop())


def test_a_configuration_file_may_be_named_as_the_first_argument(tmp_path: Path) -> None:
    """What a developer writes on day one: ``Postlane("postlane.toml")``."""
    path = tmp_path / "postlane.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "queue.db"}"\n')
    with postlane.Postlane(str(path)) as mail:
        sent = mail.send(sender="a@example.com", to=["b@example.net"], text="x")
    with postlane.Postlane(path) as mail:
        assert mail.get(sent.id).recipients[0].address == "b@example.net"
    assert (tmp_path / "queue.db").exists()


def test_without_a_configuration_file_no_new_queue_is_made_where_no_worker_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from another folder than serve's, the defaults' ./postlane.db is only a guess: a
    new queue there would keep the mail from every worker. It must exist (as for the CLI)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTLANE_CONFIG", raising=False)
    with pytest.raises(postlane.StoreUnavailable, match="there is no queue at") as caught:
        postlane.Postlane()
    assert "Postlane('path/to/postlane.toml')" in caught.value.message
    assert "--config" not in caught.value.message  # Python's ways, not the command line's
    assert not (tmp_path / "postlane.db").exists()
    with postlane.Postlane(make_config(tmp_path)):  # a configuration given: made
        pass
    with postlane.Postlane() as mail:  # now it exists
        assert mail.send(sender="a@example.com", to=["b@example.net"], text="x").id


def test_a_message_may_be_a_mapping_as_for_the_http_client(tmp_path: Path) -> None:
    with postlane.Postlane(make_config(tmp_path)) as mail:
        one = mail.send({"from": "a@example.com", "to": ["b@example.net"], "text": "x"})
        [two] = mail.send_many([{"sender": "a@example.com", "to": ["c@example.net"], "text": "y"}])
        assert one.id != two.id
        with pytest.raises(postlane.ValidationError, match="unknown message field 'txt'"):
            mail.send(sender="a@example.com", to=["b@example.net"], txt="x")
        with pytest.raises(postlane.ValidationError, match=r"a postlane\.Message or a mapping"):
            mail.send(["not", "a", "message"])  # type: ignore[arg-type]


async def test_the_async_api(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with postlane.AsyncPostlane(config) as mail:
        result = await mail.send(
            postlane.Message(sender="a@example.com", to=["b@example.net"], text="x", lane="high")
        )
        view = await mail.get(result.id)
        assert view.lane is postlane.Lane.HIGH
        results = await mail.send_many(
            [
                postlane.Message(sender="a@example.com", to=[f"u{i}@example.net"], text="x")
                for i in range(5)
            ]
        )
        assert len({r.id for r in results}) == 5
        with pytest.raises(ValidationError, match="not a valid address"):
            await mail.send(sender="a@example.com", to=["nope"], text="x")
        with pytest.raises(ValidationError, match="unknown message field"):
            await mail.send(sender="a@example.com", to=["b@example.net"], text="x", colour="red")
        with pytest.raises(NotFound):
            await mail.get("nosuchid")
        assert await mail.send(from_="a@example.com", to=["b@example.net"], text="x")


def test_a_bad_batch_stores_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with postlane.Postlane(config) as mail:
        with pytest.raises(ValidationError):
            mail.send_many(
                [
                    postlane.Message(sender="a@example.com", to=["b@example.net"], text="ok"),
                    postlane.Message(sender="a@example.com", to=["bad@@example.net"], text="no"),
                ]
            )
        assert mail.messages() == []


def test_the_sync_api_passes_suppression_keywords_on(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with postlane.Postlane(config) as mail:
        assert mail.suppress(
            "ada@example.net",
            reason="complaint",
            scope="example.com",
            expires_at="2099-01-01T00:00:00Z",
            detail="ticket 12",
        )
        # the same reason again is a repeat (another reason would be an entry of its own)
        assert not mail.suppress("ada@example.net", reason="complaint", scope="example.com")
        assert mail.suppress("bob@example.net", reason="asked by phone")
        ada, bob = sorted(mail.suppressions(), key=lambda s: s.address)
        assert (ada.reason, ada.scope, ada.detail, ada.source) == (
            "complaint",
            "example.com",
            "ticket 12",
            "operator",
        )
        assert ada.expires_at is not None
        assert (bob.reason, bob.detail) == ("manual", "asked by phone")
        assert mail.unsuppress("ada@example.net")
        assert [s.address for s in mail.suppressions()] == ["bob@example.net"]


def test_a_script_that_never_closes_postlane_exits_cleanly(pg_schema: str, tmp_path: Path) -> None:
    """An operator's audit: a script using ``postlane.Postlane()`` on PostgreSQL, never
    closed (the README's example does not), printed "Task was destroyed but it is pending!"
    three times at exit. It is closed at exit; the message was stored."""
    import subprocess
    import sys

    (tmp_path / "postlane.toml").write_text(f'[store]\nurl = "{pg_schema}"\n')
    script = (
        "import postlane\n"
        "mail = postlane.Postlane('postlane.toml')\n"
        "print(mail.send(sender='a@example.com', to=['b@example.net'], text='x').id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    with postlane.Postlane(tmp_path / "postlane.toml") as mail:
        assert mail.get(done.stdout.strip()).recipients[0].address == "b@example.net"


_GOOD = {"sender": "a@example.com", "to": ["b@example.net"], "text": "x"}


@pytest.mark.parametrize(
    ("fields", "field", "said"),
    [
        ({"to": None}, "to", "to must be an address or a list of addresses (strings), not None"),
        ({"to": 5}, "to", "not int"),
        ({"to": ["b@example.net", None]}, "to", "not a list holding None"),
        ({"cc": b"c@example.net"}, "cc", "not bytes"),
        ({"sender": None}, "from", "sender must be an address (a string), not None"),
        ({"sender": b"a@example.com"}, "from", "not bytes"),
        ({"subject": 5}, "subject", "subject must be a string, not int"),
        ({"subject": b"x"}, "subject", "subject must be a string, not bytes"),
        ({"text": 5}, "text", "text must be a string, not int"),
        ({"html": ["<p>"]}, "html", "html must be a string, not list"),
        ({"lane": 5}, "lane", "lane must be high, normal or low (a string), not int"),
        ({"headers": [("X-A", "b")]}, "headers", "headers must be a mapping"),
        ({"metadata": []}, "metadata", "metadata must be an object"),
        ({"attachments": 5}, "attachments", "attachments must be a list of postlane.Attachment"),
        ({"attachments": [b"x"]}, "attachments", "postlane.Attachment values, not bytes"),
        (
            {"attachments": [postlane.Attachment(5, b"x")]},  # type: ignore[arg-type]
            "attachments",
            "an attachment's filename must be a string, not int",
        ),
        (
            {"attachments": [postlane.Attachment("a.txt", b"x", 5)]},  # type: ignore[arg-type]
            "attachments",
            "an attachment's content_type must be a string, not int",
        ),
        (
            {"attachments": [postlane.Attachment("a.txt", "x")]},  # type: ignore[arg-type]
            "attachments",
            "content must be bytes, not str",
        ),
        (
            {"text": None, "raw": 5},
            "raw",
            "raw must be a whole message as bytes or str, not int",
        ),
        ({"text": None, "raw": 10**6}, "raw", "not int"),  # bytes(10**6): a megabyte of NULs
    ],
)
async def test_a_field_of_the_wrong_type_is_a_validation_error_naming_it(
    tmp_path: Path, fields: dict[str, object], field: str, said: str
) -> None:
    """A wrong type raised TypeError or AttributeError from deep inside (``None`` has no
    ``strip``), and ``raw=5`` was read as five NUL bytes: each is a ValidationError naming
    the field and what it takes, and nothing is stored, whichever way the message comes."""
    config = make_config(tmp_path)
    async with postlane.AsyncPostlane(config) as mail:
        message = {**_GOOD, **fields}
        for attempt in (
            lambda: mail.send(**message),
            lambda: mail.send(postlane.Message(**message)),  # type: ignore[arg-type]
            lambda: mail.send_many([message]),
        ):
            with pytest.raises(ValidationError) as refused:
                await attempt()
            assert refused.value.field == field
            assert said in refused.value.message
        assert await mail.messages() == []


def test_the_sync_api_refuses_wrong_types_as_validation_errors(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with postlane.Postlane(config) as mail:
        with pytest.raises(ValidationError, match="to must be an address or a list"):
            mail.send(sender="a@example.com", to=None, text="x")
        with pytest.raises(ValidationError, match="raw must be a whole message"):
            mail.send(sender="a@example.com", to=["b@example.net"], raw=5)
        with pytest.raises(ValidationError, match="send_many takes a list of messages"):
            mail.send_many(None)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="send_many takes a list of messages"):
            mail.send_many(_GOOD)  # type: ignore[arg-type]
        assert mail.messages() == []


def test_the_types_a_field_may_take_are_still_taken(tmp_path: Path) -> None:
    """One address as a string, a tuple or a set of them, raw as bytearray or memoryview."""
    raw = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    config = make_config(tmp_path)
    with postlane.Postlane(config) as mail:
        mail.send(sender="a@example.com", to="b@example.net", text="x")
        mail.send(sender="a@example.com", to=("b@example.net",), cc={"c@example.net"}, text="x")
        mail.send(sender="a@example.com", to=[], raw=bytearray(raw))
        mail.send(sender="a@example.com", to=[], raw=memoryview(raw), lane=postlane.Lane.HIGH)
        assert len(mail.messages()) == 4


@pytest.mark.parametrize(
    ("keywords", "field", "said"),
    [
        ({"scope": 5}, "scope", "scope must be * or a sender domain (a string), not int"),
        ({"lanes": 5}, "lanes", "lanes must be a lane or a list of lanes"),
        ({"lanes": ["high", 1]}, "lanes", "not a list holding int"),
        ({"reason": 5}, "reason", "reason must be a string, not int"),
        ({"detail": b"x"}, "detail", "detail must be a string, not bytes"),
        ({"source": None}, "source", "source must be a string, not None"),
    ],
)
async def test_suppress_refuses_wrong_types_as_validation_errors(
    tmp_path: Path, keywords: dict[str, object], field: str, said: str
) -> None:
    config = make_config(tmp_path)
    async with postlane.AsyncPostlane(config) as mail:
        with pytest.raises(ValidationError) as refused:
            await mail.suppress("ada@example.net", **keywords)  # type: ignore[arg-type]
        assert refused.value.field == field and said in refused.value.message
        with pytest.raises(ValidationError, match="address must be a string, not int"):
            await mail.suppress(5)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="address must be a string, not None"):
            await mail.unsuppress(None)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="scope must be"):
            await mail.unsuppress("ada@example.net", scope=5)  # type: ignore[arg-type]
        assert await mail.suppressions() == []
