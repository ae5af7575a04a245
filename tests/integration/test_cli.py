"""The command line as users run it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.processes import clean_environment


def postlane(
    *args: str, cwd: Path, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = clean_environment(env)
    return subprocess.run(
        ["postlane", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        env=environment,
    )


def ok(*args: str, cwd: Path, **kw: Any) -> str:
    result = postlane(*args, cwd=cwd, **kw)
    assert result.returncode == 0, result.stderr
    return result.stdout


def new_queue(cwd: Path, *config: str) -> None:
    """Create the store there as a user does without a configuration file: only ``serve`` and
    ``worker`` make one (a burst worker with nothing to deliver)."""
    ok(*config, "worker", "--burst", cwd=cwd)


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    """A folder with an empty queue in it (./postlane.db)."""
    new_queue(tmp_path)
    return tmp_path


def one_line_error(result: subprocess.CompletedProcess[str], contains: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert contains in lines[0], lines[0]


def test_send_list_show_stats_with_json(queue_dir: Path) -> None:
    tmp_path = queue_dir
    out = json.loads(
        ok(
            "send",
            "--from",
            "app@example.com",
            "--to",
            "ada@example.net",
            "--to",
            "bob@example.org",
            "--subject",
            "Hi",
            "--text",
            "Hello",
            "--lane",
            "high",
            "--idempotency-key",
            "k1",
            "--header",
            "X-Campaign: spring",
            "--json",
            cwd=tmp_path,
        )
    )
    assert set(out) == {"id", "duplicate"} and out["duplicate"] is False
    first_send = [
        "send", "--from", "app@example.com", "--to", "ada@example.net", "--to",
        "bob@example.org", "--subject", "Hi", "--text", "Hello", "--lane", "high",
        "--idempotency-key", "k1", "--header", "X-Campaign: spring", "--json",
    ]  # fmt: skip
    again = json.loads(ok(*first_send, cwd=tmp_path))  # a retry: the same submission
    assert again == {"id": out["id"], "duplicate": True}
    # the key again with another message: refused in one line, nothing stored
    refused = postlane(
        "send", "--from", "app@example.com", "--to", "x@example.net", "--text", "x",
        "--idempotency-key", "k1", cwd=tmp_path,
    )  # fmt: skip
    one_line_error(refused, "idempotency key 'k1' was already used")

    [message] = json.loads(ok("queue", "list", "--json", cwd=tmp_path))
    expected = {
        "id",
        "lane",
        "state",
        "created_at",
        "sender",
        "subject",
        "size",
        "message_id",
        "idempotency_key",
        "recipients",
    }
    assert expected <= set(message)
    assert message["lane"] == "high" and message["state"] == "queued"
    assert message["created_at"].endswith("Z")
    recipient_fields = {
        "address",
        "domain",
        "state",
        "attempts",
        "next_attempt_at",
        "last_response",
    }
    assert all(recipient_fields <= set(r) for r in message["recipients"])

    shown = json.loads(ok("queue", "show", out["id"], "--json", cwd=tmp_path))
    assert all("history" in r for r in shown["recipients"])
    assert shown["idempotency_key"] == "k1"

    stats = json.loads(ok("stats", "--json", cwd=tmp_path))
    assert set(stats) >= {"lanes", "sent", "dead", "suppressed"}
    assert set(stats["lanes"]) == {"high", "normal", "low"}
    assert set(stats["lanes"]["high"]) == {
        "ready",
        "deferred",
        "held",
        "sending",
        "oldest_age_seconds",
        "scheduled",
    }
    assert stats["lanes"]["high"]["ready"] == 2

    human = ok("queue", "list", cwd=tmp_path)
    assert out["id"] in human and "ada@example.net" in human
    raw = ok("queue", "show", out["id"], "--raw", cwd=tmp_path)
    assert "X-Campaign: spring" in raw


def test_burst_worker_delivers_to_the_capture_folder(queue_dir: Path) -> None:
    tmp_path = queue_dir
    queue_id = ok(
        "send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x", cwd=tmp_path
    ).strip()
    ok("worker", "--burst", cwd=tmp_path)
    assert list((tmp_path / "postlane-capture").glob(f"{queue_id}-*.eml"))
    [sent] = json.loads(ok("queue", "list", "--state", "sent", "--json", cwd=tmp_path))
    assert sent["recipients"][0]["last_response"]["class"] == "delivered"
    assert json.loads(ok("queue", "list", "--json", cwd=tmp_path)) == []


def test_a_burst_worker_sends_with_return_paths_and_unsubscribe_links(tmp_path: Path) -> None:
    """A session's review: ``worker --burst`` built its transport without the store's keys, so
    mail sent by a cron burst had no VERP return path and no unsubscribe link (serve's had)."""
    (tmp_path / "postlane.toml").write_text(
        '[store]\nurl = "sqlite:///q.db"\n'
        '[delivery]\nrelay = "capture://captured"\n'
        '[bounces]\ndomain = "bounces.example.com"\n'
        '[unsubscribe]\nurl = "https://mail.example.com/u"\n'
    )
    ok("send", "--from", "news@example.com", "--to", "b@example.net", "--text", "x",
       "--lane", "low", cwd=tmp_path)  # fmt: skip
    ok("worker", "--burst", cwd=tmp_path)
    [eml] = (tmp_path / "captured").glob("*.eml")
    content = eml.read_bytes()
    assert b"List-Unsubscribe: <https://mail.example.com/u/" in content
    assert b"@bounces.example.com" in content.split(b"\r\n\r\n", 1)[0]


def test_a_listing_that_matches_nothing_says_so_not_that_the_queue_is_empty(
    queue_dir: Path,
) -> None:
    """An operator's audit: `queue list --domain nosuch.example` on a queue of 5,000 messages
    printed "Mail queue is empty"."""
    ok("send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x", cwd=queue_dir)
    assert ok("queue", "list", "--domain", "nosuch.example", cwd=queue_dir).strip() == (
        "No message matches the selection"
    )
    assert "b@example.net" in ok("queue", "list", cwd=queue_dir)
    assert ok("queue", "list", "--state", "dead", cwd=queue_dir).strip() == (
        "No message matches the selection"
    )


def test_send_reads_an_eml_and_stdin(queue_dir: Path) -> None:
    tmp_path = queue_dir
    eml = tmp_path / "m.eml"
    eml.write_text("From: a@example.com\nTo: b@example.net\nSubject: from eml\n\nhi\n")
    queue_id = ok("send", "--eml", str(eml), cwd=tmp_path).strip()
    shown = json.loads(ok("queue", "show", queue_id, "--json", cwd=tmp_path))
    assert shown["subject"] == "from eml" and shown["recipients"][0]["address"] == "b@example.net"
    queue_id = ok(
        "send", "--from", "a@example.com", "--to", "b@example.net", cwd=tmp_path, input="piped body"
    ).strip()
    assert "piped body" in ok("queue", "show", queue_id, "--raw", cwd=tmp_path)
    # --html beside --text, as --html-file (a day-one user looked for it)
    queue_id = ok(
        *("send", "--from", "a@example.com", "--to", "b@example.net", "--text", "plain"),
        *("--html", "<p>rich</p>"),
        cwd=tmp_path,
    ).strip()
    raw = ok("queue", "show", queue_id, "--raw", cwd=tmp_path)
    assert "multipart/alternative" in raw and "<p>rich</p>" in raw and "plain" in raw
    one_line_error(
        postlane(
            *("send", "--from", "a@example.com", "--to", "b@example.net", "--html", "<p>x</p>"),
            *("--html-file", str(eml)),
            cwd=tmp_path,
        ),
        "give --html or --html-file, not both",
    )


def test_config_before_or_after_the_command(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "custom.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "custom.db"}"\n')
    new_queue(tmp_path / "elsewhere", "--config", str(config))
    ok(
        "--config",
        str(config),
        "send",
        "--from",
        "a@example.com",
        "--to",
        "b@example.net",
        "--text",
        "x",
        cwd=tmp_path / "elsewhere",
    )
    assert (tmp_path / "custom.db").exists()
    assert (
        len(
            json.loads(
                ok("queue", "list", "--json", "--config", str(config), cwd=tmp_path / "elsewhere")
            )
        )
        == 1
    )
    assert (
        len(
            json.loads(
                ok(
                    "queue",
                    "list",
                    "--json",
                    cwd=tmp_path / "elsewhere",
                    env={"POSTLANE_CONFIG": str(config)},
                )
            )
        )
        == 1
    )


def test_classify_explains(tmp_path: Path) -> None:
    out = json.loads(
        ok(
            "classify",
            "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown",
            "--json",
            cwd=tmp_path,
        )
    )
    assert out["class"] == "hard_bounce" and out["code"] == 550 and out["enhanced"] == "5.1.1"
    human = ok("classify", "421 4.7.0 Try again later, closing connection", cwd=tmp_path)
    assert "rule" in human and "no reply code" not in human
    # text with no code is read as an error before any reply, and it says so (a day-one
    # user's "hello" came back "connection (no code)" with nothing more)
    hello = ok("classify", "hello", cwd=tmp_path)
    assert "no reply code in it: read as an error before any reply" in hello


def test_a_bad_expiry_is_a_usage_error_saying_what_it_takes(queue_dir: Path) -> None:
    """``--expires 5q`` exited 1 saying only "ISO 8601 or Unix seconds", though a delay is
    what most give: a bad value is a usage error (exit 2, docs/operations.md)."""
    for value in ("5q", "99999999999d"):
        bad = postlane("suppress", "add", "x@example.net", "--expires", value, cwd=queue_dir)
        assert bad.returncode == 2, bad.stderr
        assert "neither a delay (90d, 12h) nor a time" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_a_store_in_a_directory_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    """A mistyped SQLite path made the directory and an empty queue, and serve ran on it as if
    the mail were gone; a path under a file said only 'File exists'."""
    (tmp_path / "a-file").write_text("")
    for where in (tmp_path / "no-such-dir" / "q.db", tmp_path / "a-file" / "q.db"):
        config = tmp_path / "postlane.toml"
        config.write_text(f'[store]\nurl = "sqlite:///{where}"\n')
        result = postlane("--config", str(config), "migrate", cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert f"{where.parent} is not a directory (create it, or correct [store] url)" in (
            result.stderr
        )
    assert not (tmp_path / "no-such-dir").exists()


def test_dlq_and_suppression_commands(queue_dir: Path) -> None:
    tmp_path = queue_dir
    added = postlane("suppress", "add", "gone@example.net", "--reason", "asked us", cwd=tmp_path)
    assert added.returncode == 0 and added.stdout == ""  # a confirmation: on stderr
    assert "gone@example.net: added" in added.stderr
    [entry] = json.loads(ok("suppress", "list", "--json", cwd=tmp_path))
    assert entry["address"] == "gone@example.net" and entry["source"] == "operator"
    assert json.loads(ok("dlq", "list", "--json", cwd=tmp_path)) == []
    removed = postlane("suppress", "remove", "gone@example.net", cwd=tmp_path)
    assert removed.returncode == 0 and "gone@example.net: removed" in removed.stderr
    one_line_error(
        postlane("suppress", "remove", "gone@example.net", cwd=tmp_path),
        "not on the suppression list",
    )
    # a mistaken hard bounce removed on its own: the recipient's unsubscribe stays
    ok("suppress", "add", "ada@example.net", "--reason", "unsubscribe", "--lane", "low",
       cwd=tmp_path)  # fmt: skip
    ok("suppress", "add", "ada@example.net", "--reason", "hard_bounce", cwd=tmp_path)
    assert len(json.loads(ok("suppress", "list", "--json", cwd=tmp_path))) == 2
    ok("suppress", "remove", "ada@example.net", "--reason", "hard_bounce", cwd=tmp_path)
    [left] = json.loads(ok("suppress", "list", "--json", cwd=tmp_path))
    assert (left["reason"], left["lanes"]) == ("unsubscribe", ["low"])


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["queue", "show", "nosuchid"], "no message with id"),
        (["dlq", "show", "nosuchid"], "no message with id"),
        (
            ["send", "--from", "a@example.com", "--to", "bad@@x", "--text", "x"],
            "not a valid address",
        ),
        (
            [
                "send",
                "--from",
                "a@example.com",
                "--to",
                "b@example.net",
                "--subject",
                "a\nBcc: x@y.z",
                "--text",
                "x",
            ],
            "header injection",
        ),
        (["send", "--from", "a@example.com", "--text", "x"], "no recipient"),
        (["queue", "list", "--metadata", "novalue"], "'novalue' is not KEY=VALUE"),
        (["queue", "list", "--older-than", "soon"], "duration"),
        (["dlq", "list", "--state", "bogus"], "--state"),  # dead letters are always dead
        (["dlq", "requeue", "--all", "--state", "dead"], "--state"),
        (["queue", "import", "/nonexistent/export.jsonl"], "cannot read"),
        (["--config", "/nonexistent.toml", "stats"], "does not exist"),
        (["--config", "/", "stats"], "is a directory, not a file"),
        (["--config", sys.executable, "stats"], "not a TOML file (not UTF-8 text)"),
        (["suppress", "add", "not an address"], "not a valid address"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(
    queue_dir: Path, args: list[str], contains: str
) -> None:
    tmp_path = queue_dir
    one_line_error(postlane(*args, cwd=tmp_path), contains)
    if args[0] == "send":
        assert json.loads(ok("queue", "list", "--json", cwd=tmp_path)) == []  # nothing half-stored


@pytest.mark.parametrize(
    "args",
    [
        [b"queue", b"list", b"--domain", b"\xff"],
        [b"suppress", b"remove", b"s\xff@example.com"],
        [b"send", b"--from", b"a@example.com", b"--to", b"\xffb@example.net", b"--text", b"x"],
    ],
)
def test_an_argument_that_is_not_utf_8_is_one_line_not_an_internal_error(
    queue_dir: Path, args: list[bytes]
) -> None:
    """Bytes the locale cannot decode reach Python as surrogate escapes, which every later
    encode refused with an "internal error"."""
    done = subprocess.run(
        [b"postlane", *args], cwd=queue_dir, capture_output=True, text=True, timeout=60,
        env=clean_environment(),
    )  # fmt: skip
    one_line_error(done, "an argument is not valid UTF-8: b'")
    assert done.returncode == 2
    assert json.loads(ok("queue", "list", "--json", cwd=queue_dir)) == []


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (
            [
                "send",
                "--from",
                "a@example.com",
                "--to",
                "b@example.net",
                "--text",
                "x",
                "--lane",
                "urgent",
            ],
            "'urgent' is not one of high, normal, low",
        ),
        (["queue", "list", "--state", "bogus"], "'bogus' is not one of queued, sending,"),
        (["queue", "list", "--lane", "bogus"], "'--lane': 'bogus' is not one of high, normal"),
    ],
)
def test_issue_17_10_an_unknown_lane_or_state_lists_the_choices(
    queue_dir: Path, args: list[str], contains: str
) -> None:
    """`--lane urgent` said `'urgent' is not a valid Lane`: the refusal lists the lanes."""
    test_bad_input_is_one_clear_line_and_a_nonzero_exit(queue_dir, args, contains)


@pytest.mark.parametrize("reply", ["", "  "])
def test_issue_17_10_classify_refuses_an_empty_reply(queue_dir: Path, reply: str) -> None:
    """`postlane classify ""` answered `connection (no code)`: it asks for a reply instead."""
    one_line_error(postlane("classify", reply, cwd=queue_dir), "give a server reply to classify")


def test_issue_17_10_confirmations_go_to_stderr_and_results_to_stdout(queue_dir: Path) -> None:
    """Decided, as Postfix's commands do (docs/operations.md, Output): what a command produces
    goes to stdout, what it says about what it did goes to stderr, so `ID=$(postlane send ...)`
    and `postlane queue list | ...` get only the result."""
    sent = postlane(
        "send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x", cwd=queue_dir
    )
    assert sent.returncode == 0 and sent.stderr == ""
    queue_id = sent.stdout.strip()
    assert len(sent.stdout.splitlines()) == 1 and " " not in queue_id  # the id alone
    held = postlane("queue", "hold", queue_id, cwd=queue_dir)
    assert held.returncode == 0 and held.stdout == "" and "held 1 recipient(s)" in held.stderr
    added = postlane("suppress", "add", "gone@example.net", cwd=queue_dir)
    assert added.returncode == 0 and added.stdout == ""
    assert "gone@example.net: added" in added.stderr
    [listed] = json.loads(ok("queue", "list", "--json", cwd=queue_dir))
    assert listed["id"] == queue_id


def test_issue_17_10_stats_names_states_as_state_and_metrics_do(queue_dir: Path) -> None:
    """`stats` said `ready` where `--state` and the metrics say `queued`: its columns are the
    states `queue list --state` takes (and the JSON keeps the contract's `ready` key)."""
    from postlane.message import RecipientState

    states = {state.value for state in RecipientState}
    header = ok("stats", cwd=queue_dir).splitlines()[0].split()
    assert header[0] == "lane" and header[-1] == "oldest"
    assert "ready" not in header and set(header[1:-1]) <= states, header
    for state in header[1:-1]:
        assert json.loads(ok("queue", "list", "--state", state, "--json", cwd=queue_dir)) == []


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "postlane.toml").write_text('[delivery]\nrelai = "smtp://x"\n')
    one_line_error(postlane("stats", cwd=tmp_path), "delivery.relai")


def test_an_unreachable_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "postlane.toml").write_text('[store]\nurl = "sqlite:////proc/no/such/dir/q.db"\n')
    one_line_error(postlane("stats", cwd=tmp_path), "there is no queue at /proc/no/such/dir/q.db")
    send = ["send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x"]
    one_line_error(postlane(*send, cwd=tmp_path), "cannot create /proc/no/such/dir/q.db")
    one_line_error(postlane("worker", "--burst", cwd=tmp_path), "cannot")


# what each command imports, in a fresh interpreter: main(), then which modules were loaded
_IMPORTED_BY = """
import json, sys
from postlane.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def imported_by(*args: str, cwd: Path) -> set[str]:
    import sys

    environment = clean_environment()
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED_BY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    return set(json.loads(result.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["stats", "--help"], ["stats", "--json"]])
def test_commands_other_than_simulate_do_not_load_the_simulator(
    tmp_path: Path, args: list[str]
) -> None:
    modules = imported_by(*args, cwd=tmp_path)
    assert "postlane.cli" in modules
    assert not {
        m for m in modules if m == "postlane.simulate" or m.startswith("postlane.simulate.")
    }


def test_the_simulate_command_loads_the_simulator(tmp_path: Path) -> None:
    assert "postlane.simulate.simulator" in imported_by("simulate", "--list", cwd=tmp_path)


# -- which queue (new user's item 2) -------------------------------------------------------------


def test_issue_17_2_commands_run_from_another_directory_never_start_a_new_queue(
    tmp_path: Path,
) -> None:
    """The real console script, from a directory with no queue: every command that reads or
    changes the queue says there is none (naming where it looked), and creates nothing."""
    server, elsewhere = tmp_path / "server", tmp_path / "elsewhere"
    server.mkdir()
    elsewhere.mkdir()
    new_queue(server)
    ok("send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x", cwd=server)
    send = ["send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x"]
    for args in (["queue", "list"], ["stats"], send, ["dlq", "list"], ["suppress", "list"]):
        one_line_error(
            postlane(*args, cwd=elsewhere), f"there is no queue at {elsewhere / 'postlane.db'}"
        )
    said = postlane("stats", cwd=elsewhere).stderr
    assert "run where its postlane.toml is, or give --config" in said
    assert "Postlane(" not in said  # the command line's ways only
    assert list(elsewhere.iterdir()) == []  # no postlane.db, no capture folder
    # with its configuration, the server's queue is found from anywhere
    (server / "postlane.toml").write_text("")
    listed = json.loads(
        ok("queue", "list", "--json", "--config", str(server / "postlane.toml"), cwd=elsewhere)
    )
    assert len(listed) == 1


def test_the_first_send_makes_the_store_a_configuration_file_names(tmp_path: Path) -> None:
    """A configuration file says where the queue is, whatever the directory: the first
    ``send`` (before ``serve`` ever ran) makes it there, as the Python API does, and the server
    started on that file delivers it. Read and operator commands still make no store, and
    without a configuration file ``send`` neither (issue 17's item 2)."""
    config = tmp_path / "conf" / "postlane.toml"
    config.parent.mkdir()
    store = tmp_path / "data" / "queue.db"
    store.parent.mkdir()  # made by its owner: a missing one is a mistyped path (test below)
    config.write_text(f'[store]\nurl = "sqlite:///{store}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    one_line_error(
        postlane("--config", str(config), "queue", "list", cwd=elsewhere),
        f"there is no queue at {store} (postlane serve, postlane worker or postlane migrate "
        "creates it)",
    )
    # the configuration was given: no hint to give it, nor the Python API's (a day-one audit)
    said = postlane("--config", str(config), "stats", cwd=elsewhere).stderr
    assert "--config" not in said and "Postlane(" not in said
    assert not store.exists()
    send = ["send", "--from", "a@example.com", "--to", "b@example.net", "--text", "x", "--json"]
    sent = json.loads(ok("--config", str(config), *send, cwd=elsewhere))
    listed = json.loads(ok("--config", str(config), "queue", "list", "--json", cwd=elsewhere))
    assert [m["id"] for m in listed] == [sent["id"]] and sent["duplicate"] is False
    assert store.is_file() and list(elsewhere.iterdir()) == []
    assert store.stat().st_mode & 0o077 == 0  # the queue holds whole messages: owner only


def test_issue_17_2_verbose_and_stats_say_which_store(queue_dir: Path) -> None:
    store = f"sqlite:///{queue_dir / 'postlane.db'}"
    for args in (["-v", "queue", "list"], ["queue", "list", "--verbose"], ["dlq", "list", "-v"]):
        result = postlane(*args, cwd=queue_dir)
        assert result.returncode == 0, result.stderr
        assert f"store: {store}" in result.stderr.splitlines()
        assert "configuration: built-in defaults" in result.stderr.splitlines()
        assert "store:" not in result.stdout
    human = ok("stats", cwd=queue_dir)
    assert f"store: {store}" in human.splitlines()
    header = human.splitlines()[0].split()
    assert header == ["lane", "queued", "deferred", "held", "sending", "oldest"]
    data = json.loads(ok("stats", "--json", cwd=queue_dir))
    assert data["store"] == store
    assert set(data["lanes"]["normal"]) >= {"ready"}  # the contract's key stays


# -- the whole configuration, checked by every command (new user's item 5; audit 9) ---------------


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[delivery]\nrelay = "smtpx://relay.example.com"\n', '"mx", capture:///path'),
        (
            '[delivery]\nrelay = "smtp://relayuser:S3cretRelayPw@relay.example.com:99999"\n',
            "delivery.relay: bad port '99999'",
        ),
        (
            '[[routes]]\nlane = ["high"]\nrelay = "smtp://u:S3cretRelayPw@relay.example.com:0x19"\n',
            "routes[1].relay: bad port '0x19'",
        ),
        ('[delivery]\nrelay = "postmark://${POSTLANE_NO_SUCH_TOKEN}"\n', "POSTLANE_NO_SUCH"),
        ('[delivery]\nrelay = "postmark://S3cretRelayPw?colour=red"\n', "unknown option"),
        (
            '[[routes]]\nlane = ["high"]\nfallback = "mx"\n'
            'relay = "postmark://S3cretRelayPw?colour=red"\n',
            "routes[1].relay: unknown option 'colour'",
        ),
        ('[delivery]\nrelay = "ses://AKIAKEY:S3cretRelayPw"\n', "not an AWS region"),
        ('[dkim."example.com"]\nselector = "s1"\nprivate_key = "none.pem"\n', "private_key"),
        ("[delivery]\npassword = 12345678\n", "delivery.password: expected a string"),
    ],
)
def test_issue_17_5_every_command_checks_the_whole_configuration(
    queue_dir: Path, toml: str, named: str
) -> None:
    (queue_dir / "postlane.toml").write_text(toml)
    for args in (["stats"], ["queue", "list"], ["worker", "--burst"]):
        result = postlane(*args, cwd=queue_dir)
        one_line_error(result, named)
        assert "S3cretRelayPw" not in result.stderr and "12345678" not in result.stderr


def test_issue_17_3_a_relay_url_takes_its_token_from_the_environment(queue_dir: Path) -> None:
    (queue_dir / "postlane.toml").write_text('[delivery]\nrelay = "postmark://${POSTMARK_TOKEN}"\n')
    result = postlane("-v", "stats", cwd=queue_dir, env={"POSTMARK_TOKEN": "pm-server-token"})
    assert result.returncode == 0, result.stderr


# -- files others must not read (audit 8) ---------------------------------------------------------


def test_finding_8_worker_warns_once_about_a_database_and_a_dkim_key_others_can_read(
    queue_dir: Path,
) -> None:
    ok("dkim", "keygen", "example.com", "--selector", "s1", cwd=queue_dir)
    (queue_dir / "postlane.toml").write_text(
        '[dkim."example.com"]\nselector = "s1"\nprivate_key = "dkim/example.com.pem"\n'
    )
    quiet = postlane("worker", "--burst", cwd=queue_dir)
    assert quiet.returncode == 0 and "readable by other users" not in quiet.stderr
    (queue_dir / "postlane.db").chmod(0o644)
    (queue_dir / "dkim" / "example.com.pem").chmod(0o640)
    loud = postlane("worker", "--burst", cwd=queue_dir)
    assert loud.returncode == 0, loud.stderr
    [warning] = [line for line in loud.stderr.splitlines() if "readable by other users" in line]
    assert f"{queue_dir / 'postlane.db'} (mode 0644)" in warning
    assert f"{queue_dir / 'dkim' / 'example.com.pem'} (mode 0640)" in warning


# -- polish (new user's item 10) --------------------------------------------------------------


def test_issue_17_10_python_dash_m_postlane_is_the_cli(tmp_path: Path) -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "postlane", "classify", "550 5.1.1 unknown user", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["class"] == "hard_bounce"


def test_issue_17_10_suppress_help_describes_each_command(tmp_path: Path) -> None:
    text = ok("suppress", "--help", cwd=tmp_path)
    for command in ("add", "list", "remove"):
        [line] = [line for line in text.splitlines() if line.strip().startswith(command + " ")]
        assert len(line.split()) > 2, line  # a description after the name


def test_migrate_creates_the_store_says_its_schema_and_exits(tmp_path: Path) -> None:
    from postlane.store.sqlite import SCHEMA_VERSION

    out = ok("migrate", cwd=tmp_path)
    assert (tmp_path / "postlane.db").exists()
    assert out.strip().endswith(f"created at schema version {SCHEMA_VERSION}")
    again = ok("migrate", cwd=tmp_path)  # nothing left to do, and it says so
    assert again.strip().endswith(f"schema version {SCHEMA_VERSION}, nothing to migrate")


def test_only_serve_worker_and_migrate_upgrade_a_store_and_they_say_so(tmp_path: Path) -> None:
    """An upgrade audit: a read-only `postlane stats` of a new postlane silently migrated the
    store under a running older serve, whose batches then failed against the new schema (and
    mail it had delivered was sent again after its restart)."""
    import sqlite3

    from postlane.store.sqlite import MIGRATIONS, SCHEMA_VERSION, _split_statements

    db = tmp_path / "postlane.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for _number, _name, sql in MIGRATIONS[:-1]:  # as the postlane before the last migration
        for statement in _split_statements(sql):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.close()
    for command in (["stats"], ["queue", "list"], ["dlq", "list"], ["queue", "flush"]):
        result = postlane(*command, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout)
        [line] = result.stderr.strip().splitlines()
        assert f"schema version {SCHEMA_VERSION - 1}" in line and "postlane migrate" in line
        assert "Traceback" not in result.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1  # untouched
    conn.close()
    out = ok("migrate", cwd=tmp_path)
    assert f"schema version {SCHEMA_VERSION - 1} -> {SCHEMA_VERSION}" in out
    assert postlane("stats", cwd=tmp_path).returncode == 0


def test_version_says_the_store_schemas_it_brings_a_store_to(tmp_path: Path) -> None:
    from postlane.store.postgres import SCHEMA_VERSION as POSTGRES
    from postlane.store.sqlite import SCHEMA_VERSION as SQLITE

    out = ok("--version", cwd=tmp_path)
    assert out.strip().endswith(f"(store schema: SQLite {SQLITE}, PostgreSQL {POSTGRES})")


def test_send_schedules_with_at_and_expires_and_a_flush_leaves_it(queue_dir: Path) -> None:
    from datetime import datetime

    send = ("send", "--from", "a@example.com", "--to", "b@example.net", "--text", "t", "--json")
    queued = json.loads(ok(*send, "--at", "2h", "--expires", "1d", cwd=queue_dir))
    shown = json.loads(ok("queue", "show", queued["id"], "--json", cwd=queue_dir))
    at = datetime.fromisoformat(shown["send_at"]).timestamp()
    expires = datetime.fromisoformat(shown["expires_at"]).timestamp()
    assert expires - at == pytest.approx(86400 - 7200, abs=5)
    recipient = shown["recipients"][0]
    assert recipient["state"] == "queued"
    assert datetime.fromisoformat(recipient["next_attempt_at"]).timestamp() == at
    human = ok("queue", "show", queued["id"], cwd=queue_dir).splitlines()
    assert any(line.split()[:2] == ["Send", "at:"] for line in human), human  # both times
    assert any(line.split()[:1] == ["Expires:"] for line in human), human
    plain = json.loads(ok("send", *send[1:], cwd=queue_dir))["id"]
    assert "Expires:" not in ok("queue", "show", plain, cwd=queue_dir)  # no schedule, no line

    ok("queue", "flush", "--all", cwd=queue_dir)  # not late: not yet due
    shown = json.loads(ok("queue", "show", queued["id"], "--json", cwd=queue_dir))
    assert datetime.fromisoformat(shown["recipients"][0]["next_attempt_at"]).timestamp() == at
    ok("queue", "flush", "--all", "--scheduled", cwd=queue_dir)
    shown = json.loads(ok("queue", "show", queued["id"], "--json", cwd=queue_dir))
    assert datetime.fromisoformat(shown["recipients"][0]["next_attempt_at"]).timestamp() < at

    one_line_error(
        postlane(*send, "--at", "2027-01-15T08:00:00", cwd=queue_dir), "--at has no time zone"
    )
    one_line_error(
        postlane(*send, "--expires", "1700000000", cwd=queue_dir), "--expires has already passed"
    )
    # a blank value (an unset shell variable) is not "now"
    one_line_error(postlane(*send, "--at", "", cwd=queue_dir), "--at is empty")
    # a new user's audit: a refusal named the HTTP API's fields, not the command's options
    one_line_error(
        postlane(*send, "--header", "X-Postlane-Lane: high", cwd=queue_dir),
        "header X-Postlane-Lane cannot be set with --header (use --lane)",
    )
    one_line_error(
        postlane(*send, "--header", "From: b@example.com", cwd=queue_dir),
        "header From cannot be set with --header (use --from)",
    )


def test_with_no_webhook_endpoint_the_listing_is_empty(queue_dir: Path) -> None:
    assert json.loads(ok("webhooks", "list", "--json", cwd=queue_dir)) == []
    assert "No webhook endpoint is configured" in ok("webhooks", "list", cwd=queue_dir)


def test_suppress_add_takes_reason_scope_and_expiry_and_lists_them_as_json(
    queue_dir: Path,
) -> None:
    from datetime import datetime

    ok("suppress", "add", "ada@example.net", "--reason", "complaint", "--scope", "Shop.Example",
       "--expires", "90d", "--detail", "called support", cwd=queue_dir)  # fmt: skip
    ok("suppress", "add", "bob@example.net", "--reason", "asked by phone", cwd=queue_dir)
    entries = {e["address"]: e for e in json.loads(ok("suppress", "list", "--json", cwd=queue_dir))}
    ada = entries["ada@example.net"]
    assert (ada["reason"], ada["scope"], ada["detail"]) == (
        "complaint",
        "shop.example",
        "called support",
    )
    created = datetime.fromisoformat(ada["created_at"]).timestamp()
    expires = datetime.fromisoformat(ada["expires_at"]).timestamp()
    assert expires - created == pytest.approx(90 * 86400, abs=5)
    bob = entries["bob@example.net"]
    assert (bob["reason"], bob["scope"], bob["expires_at"]) == ("manual", "*", None)
    assert bob["detail"] == "asked by phone"

    # a scoped entry holds mail from that sender domain only
    send = ("send", "--to", "ada@example.net", "--text", "t", "--json")
    shop = json.loads(ok(*send, "--from", "news@shop.example", cwd=queue_dir))
    other = json.loads(ok(*send, "--from", "billing@bank.example", cwd=queue_dir))
    state = {
        name: json.loads(ok("queue", "show", queued["id"], "--json", cwd=queue_dir))["state"]
        for name, queued in (("shop", shop), ("other", other))
    }
    assert state == {"shop": "suppressed", "other": "queued"}

    one_line_error(
        postlane("suppress", "add", "c@example.net", "--scope", "not a domain", cwd=queue_dir),
        "scope must be * or a sender domain",
    )
    one_line_error(
        postlane("suppress", "add", "c@example.net", "--expires", "soon", cwd=queue_dir),
        "expires",
    )
    one_line_error(
        postlane(
            "suppress", "remove", "ada@example.net", "--scope", "other.example", cwd=queue_dir
        ),
        "not on the suppression list",
    )
    ok("suppress", "remove", "ada@example.net", "--scope", "shop.example", cwd=queue_dir)
    remaining = [e["address"] for e in json.loads(ok("suppress", "list", "--json", cwd=queue_dir))]
    assert remaining == ["bob@example.net"]


def test_suppress_add_takes_lanes_and_lists_them(queue_dir: Path) -> None:
    """An entry can stop some lanes only (an unsubscribe's, or an operator's), as the list
    shows, and a lane that does not exist is refused before anything is stored."""
    added = postlane("suppress", "add", "ada@example.net", "--scope", "shop.example",
                     "--lane", "low", "--lane", "Normal", cwd=queue_dir)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "ada@example.net (mail of lane normal, low from shop.example): added" in added.stderr
    ok("suppress", "add", "bob@example.net", cwd=queue_dir)
    entries = {e["address"]: e for e in json.loads(ok("suppress", "list", "--json", cwd=queue_dir))}
    assert entries["ada@example.net"]["lanes"] == ["normal", "low"]
    assert entries["bob@example.net"]["lanes"] is None
    rows = {
        line.split()[0]: line
        for line in ok("suppress", "list", cwd=queue_dir).splitlines()
        if "@" in line
    }
    assert "normal, low" in rows["ada@example.net"] and "every" in rows["bob@example.net"]

    send = ("send", "--from", "news@shop.example", "--to", "ada@example.net", "--text", "t")

    def state_of(lane: str) -> str:
        queued = json.loads(ok(*send, "--lane", lane, "--json", cwd=queue_dir))
        return str(json.loads(ok("queue", "show", queued["id"], "--json", cwd=queue_dir))["state"])

    state = {lane: state_of(lane) for lane in ("high", "normal", "low")}
    assert state == {"high": "queued", "normal": "suppressed", "low": "suppressed"}

    one_line_error(
        postlane("suppress", "add", "c@example.net", "--lane", "urgent", cwd=queue_dir),
        "unknown lane 'urgent' (lanes are high, normal, low)",
    )
    listed = [e["address"] for e in json.loads(ok("suppress", "list", "--json", cwd=queue_dir))]
    assert "c@example.net" not in listed


def test_events_lists_the_log_and_follow_prints_what_happens_next(queue_dir: Path) -> None:
    import select

    send = ("send", "--from", "a@example.com", "--to", "b@example.net", "--text", "t", "--json")
    first = json.loads(ok(*send, cwd=queue_dir))
    page = json.loads(ok("events", "--json", cwd=queue_dir))
    assert [(e["type"], e["message_id"]) for e in page["events"]] == [("queued", first["id"])]
    assert page["next"] == page["events"][-1]["id"]
    again = json.loads(ok("events", "--json", "--after", page["next"], cwd=queue_dir))
    assert again == {"events": [], "next": page["next"]}
    one_line_error(postlane("events", "--after", "x", cwd=queue_dir), "after must be an event id")

    environment = clean_environment()
    command = ["postlane", "events", "--follow", "--json", "--after", page["next"]]
    with subprocess.Popen(
        command, cwd=queue_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment,
    ) as follower:  # fmt: skip
        try:
            second = json.loads(ok(*send, cwd=queue_dir))
            assert follower.stdout is not None
            ready, _, _ = select.select([follower.stdout], [], [], 30)
            assert ready, "the follower printed nothing within 30 s"
            event = json.loads(follower.stdout.readline())
            assert (event["type"], event["message_id"]) == ("queued", second["id"])
        finally:
            follower.terminate()
            follower.wait(timeout=10)


def test_webhooks_commands_show_the_configured_endpoints(tmp_path: Path) -> None:
    secret = ok("webhooks", "secret", cwd=tmp_path).strip()
    assert secret.startswith("whsec_") and len(secret) > 30
    (tmp_path / "postlane.toml").write_text(
        f'[[webhooks.out]]\nname = "app"\nurl = "https://app.example.com/hooks"\n'
        f'secret = "{secret}"\nevents = ["bounced", "complained"]\n'
    )
    new_queue(tmp_path)
    [row] = json.loads(ok("webhooks", "list", "--json", cwd=tmp_path))
    assert (row["name"], row["state"], row["url"]) == (
        "app",
        "new",
        "https://app.example.com/hooks",
    )
    assert secret not in json.dumps(row)
    assert "app" in ok("webhooks", "list", cwd=tmp_path)
    one_line_error(postlane("webhooks", "resume", "crm", cwd=tmp_path), "crm")
    (tmp_path / "postlane.toml").write_text("")
    # a listing of none is empty; an endpoint named that is not configured is an error
    assert "No webhook endpoint is configured ([[webhooks.out]])" in ok(
        "webhooks", "list", cwd=tmp_path
    )
    one_line_error(postlane("webhooks", "resume", "app", cwd=tmp_path), "no webhook endpoint")


def test_feedback_lists_and_shows_unmatched_reports(queue_dir: Path) -> None:
    import asyncio

    from postlane.app import AsyncPostlane
    from postlane.config import config_from_dict
    from postlane.feedback import Report

    content = b"From: ada@example.net\r\nSubject: Out of office\r\n\r\nBack on Monday.\r\n"
    config = config_from_dict({"store": {"url": f"sqlite:///{queue_dir / 'postlane.db'}"}})

    async def keep() -> int:
        async with AsyncPostlane(config, create=False) as app:
            return await app.store.record_unmatched(
                Report("bounce listener", "auto-reply", content, "ada@example.net"),
                "an automatic reply, not a bounce",
                app.clock.now(),
            )

    assert "No unmatched reports" in ok("feedback", "list", cwd=queue_dir)
    kept = asyncio.run(keep())
    [listed] = json.loads(ok("feedback", "list", "--json", cwd=queue_dir))
    assert (listed["id"], listed["kind"]) == (kept, "auto-reply")
    assert "an automatic reply" in ok("feedback", "list", cwd=queue_dir)
    assert "Back on Monday." in ok("feedback", "show", str(kept), cwd=queue_dir)
    raw = subprocess.run(
        ["postlane", "feedback", "show", str(kept), "--raw"], cwd=queue_dir, capture_output=True
    )
    assert raw.returncode == 0 and raw.stdout == content  # the bytes as received
    one_line_error(postlane("feedback", "show", "999", cwd=queue_dir), "no unmatched report 999")


def test_a_flush_naming_a_relay_lifts_its_pause_though_no_recipient_is_named_so(
    queue_dir: Path,
) -> None:
    """The destination-paused runbook's `queue flush --domain D`, with D the alert's label
    relay:HOST:PORT: an audit got "nothing to flush" and the pause stayed (nothing selected,
    so nothing was done at all)."""
    import asyncio
    import time

    from postlane.records import DestinationStatus
    from postlane.store.sqlite import SQLiteStore

    relay = "relay:127.0.0.1:9"

    async def states(pause: bool) -> list[str]:
        store = SQLiteStore(queue_dir / "postlane.db")
        await store.open()
        try:
            if pause:
                until = time.time() + 1800
                status = DestinationStatus(relay, None, None, until, "3 connection failure(s)")
                await store.save_destination_states([status])
            now = time.time()
            return [
                d.destination
                for d in await store.destination_states()
                if (d.paused_until or 0) > now
            ]
        finally:
            await store.close()

    assert asyncio.run(states(pause=True)) == [relay]
    result = postlane("queue", "flush", "--domain", relay, cwd=queue_dir)
    assert result.returncode == 0 and "nothing to flush" in result.stderr
    assert asyncio.run(states(pause=False)) == []


def test_a_listing_bigger_than_a_pipe_arrives_whole_with_pythonunbuffered(
    queue_dir: Path,
) -> None:
    """With PYTHONUNBUFFERED=1 (usual in containers) a Python text stream drops what a short
    write leaves: `queue list --json | jq` with a reader slower than postlane got the first
    64 KiB of the JSON, and exit 0 (found by a browser test on a loaded machine)."""
    import asyncio

    async def fill() -> None:
        from postlane.app import AsyncPostlane
        from postlane.config import load_config

        async with AsyncPostlane(load_config(cwd=queue_dir)) as app:
            await app.send_many(
                [
                    {"sender": "a@x.example", "to": [f"u{n}@y.example"], "text": "x"}
                    for n in range(400)
                ]
            )

    asyncio.run(fill())
    environment = clean_environment({"PYTHONUNBUFFERED": "1"})
    with subprocess.Popen(
        ["postlane", "queue", "list", "--json"],
        cwd=queue_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=environment,
    ) as writer:
        assert writer.stdout is not None
        # read nothing until postlane has filled the pipe: gone (its short write dropped the
        # rest), or waiting in the kernel for the pipe to take more (as it should)
        wchan = Path(f"/proc/{writer.pid}/wchan")
        deadline = time.monotonic() + 30
        while writer.poll() is None and "pipe_write" not in wchan.read_text():
            assert time.monotonic() < deadline, "postlane neither wrote a full pipe nor ended"
            time.sleep(0.05)
        output = writer.stdout.read()
        assert writer.wait(timeout=30) == 0
    assert len(output) > 65536
    assert len(json.loads(output)) == 400
