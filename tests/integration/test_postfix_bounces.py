"""Real DSNs from a real MTA: a private Postfix instance is postlane's relay, the next hop
refuses a recipient after Postfix accepted it, and Postfix's own DSN comes back to the VERP
return path, through the bounce listener, into the store.

    postlane worker ──VerpTransport──▶ Postfix (127.0.0.1, own config and queue)
                                          │ example.net ──▶ aiosmtpd peer: 550 5.1.1 for nobody@
                                          │ bounce.example ◀── Postfix's DSN to b-<token>@
                                          ▼
                                   bounce listener ──▶ store: nobody@ bounced + suppressed

The instance has its own configuration and queue directory (``postfix -c DIR start``), listens
on a free port on 127.0.0.1 only, and routes with ``transport_maps``: nothing leaves the
machine and the system's Postfix (if any) is untouched. Its directories are made with mkdtemp
and opened to the ``postfix`` user, not under pytest's tmp_path, whose parents are 0700 (the
daemons drop root and must reach their queue).

Needs Postfix and root (``postfix start`` runs the master as root; its daemons switch to the
``postfix`` user): skipped otherwise, except under CI, where it must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane
from postlane.feedback.inbound import BounceProcessor
from postlane.feedback.verp import ReturnPaths, VerpTransport
from postlane.ingest.bounces import BounceListenerSettings, start_bounce_listener
from postlane.message import Message, RecipientState
from postlane.records import RecipientView
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import IN_CI, ScriptedHandler, free_port, make_config

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
POSTFIX = shutil.which("postfix", path=SBIN)


def _why_not() -> str | None:
    if POSTFIX is None:
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master starts as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user for the daemons to run as"
    return None


WHY_NOT = _why_not()
if WHY_NOT is not None:
    if IN_CI:
        pytest.fail(f"CI must run the Postfix bounce test, but {WHY_NOT}", pytrace=False)
    pytest.skip(WHY_NOT, allow_module_level=True)

pytestmark = pytest.mark.slow

BOUNCE_DOMAIN = "bounce.example"
#: how long Postfix may take to relay, refuse, write its DSN and deliver it
DSN_DEADLINE = 60.0
REFUSAL = (
    "550 5.1.1 <nobody@example.net>: Recipient address rejected: "
    "User unknown in local recipient table"
)

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """One Postfix instance with its own configuration, queue and log under ``root``."""

    def __init__(self, root: Path, port: int, routes: dict[str, int]) -> None:
        self.root = root
        self.port = port
        self.conf = root / "conf"
        self.log = root / "maillog"
        transport_maps = ", ".join(f"{d}=smtp:[127.0.0.1]:{p}" for d, p in routes.items())
        main_cf = {
            "compatibility_level": "3.6",
            "queue_directory": root / "queue",
            "data_directory": root / "data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "postfix.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": BOUNCE_DOMAIN,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "transport_maps": f"inline:{{ {transport_maps} }}",
            "smtp_dns_support_level": "disabled",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # retry quickly (a 451 from the listener is tried again within seconds)
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "maillog_file": self.log,
            "maillog_file_prefixes": root,
        }
        self.main_cf = "".join(f"{name} = {value}\n" for name, value in main_cf.items())

    async def _postfix(self, *command: str) -> tuple[int, str]:
        assert POSTFIX is not None
        process = await asyncio.create_subprocess_exec(
            POSTFIX, "-c", str(self.conf), *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        return process.returncode or 0, output.decode(errors="replace")

    async def start(self) -> None:
        for folder in (self.conf, self.root / "queue", self.root / "data"):
            folder.mkdir(parents=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        (self.conf / "main.cf").write_text(self.main_cf)
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        code, output = await self._postfix("start")
        if code != 0:
            pytest.fail(f"postfix start failed ({code}): {output}\n{self.log_text()}")
        await self._wait_until_serving()

    async def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    greeting = await reader.readline()
                    writer.close()
                    if greeting.startswith(b"220"):
                        return
            await asyncio.sleep(0.1)  # the poll interval, not a wait for something
        pytest.fail(f"Postfix did not listen on {self.port}:\n{self.log_text()}")

    async def stop(self) -> None:
        await self._postfix("stop")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no maillog)"


@pytest.fixture
def postfix_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="postlane-postfix-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def next_hop() -> AsyncIterator[tuple[int, ScriptedHandler]]:
    """The destination behind Postfix: takes ada@, refuses nobody@ at RCPT (after Postfix
    has accepted the message from postlane, so Postfix must write a DSN)."""
    handler = ScriptedHandler(rcpt={"nobody@example.net": REFUSAL})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="mx.example.net", loop=loop), "127.0.0.1", 0
    )
    yield server.sockets[0].getsockname()[1], handler
    server.close()
    await server.wait_closed()


async def test_postfixs_own_dsn_bounces_and_suppresses_the_refused_recipient(
    tmp_path: Path, postfix_root: Path, next_hop: tuple[int, ScriptedHandler]
) -> None:
    hop_port, hop = next_hop
    bounce_port = free_port()
    postfix = PrivatePostfix(
        postfix_root, free_port(), {BOUNCE_DOMAIN: bounce_port, "example.net": hop_port}
    )
    config = make_config(
        tmp_path,
        delivery={"relay": f"smtp://127.0.0.1:{postfix.port}", "tls_verify": False},
    )
    async with AsyncPostlane(config) as app:
        key = await app.store.secret("verp", app.clock.now())
        transport = VerpTransport(transport_for(config), BOUNCE_DOMAIN, key)
        worker = Worker.from_config(config, app.store, transport, clock=app.clock)
        processor = BounceProcessor(app.store, ReturnPaths(BOUNCE_DOMAIN, key), clock=app.clock)
        listener = BounceListenerSettings(listen=f"127.0.0.1:{bounce_port}")
        await postfix.start()
        try:
            async with start_bounce_listener(processor, listener):
                result = await app.send(
                    Message(
                        sender="Shop <app@shop.example>",
                        to=["ada@example.net", "nobody@example.net"],
                        subject="Your order",
                        text="It shipped.",
                    )
                )
                assert await worker.run_until_idle() == 2
                sent = await recipients(app, result.id)
                # Postfix took both: to postlane they are sent
                assert {r.state for r in sent.values()} == {RecipientState.SENT}
                nobody = await wait_for_state(app, result.id, "nobody@example.net")
        finally:
            await transport.close()
            await postfix.stop()
        log = postfix.log_text()
        assert nobody.state is RecipientState.BOUNCED, log
        assert nobody.last_response is not None
        assert nobody.last_response.code == 550 and nobody.last_response.enhanced == "5.1.1"
        assert nobody.last_response.text == REFUSAL  # Postfix's diagnostic, as the hop said it
        assert [h.relay for h in nobody.history or ()][-1] == "dsn"
        final = await recipients(app, result.id)
        assert final["ada@example.net"].state is RecipientState.SENT
        listed = await app.store.list_suppressions(limit=10)
        assert [(s.address, s.scope, s.reason) for s in listed] == [
            ("nobody@example.net", "*", "hard_bounce")
        ]
        [ada] = await app.store.find_deliveries("ada@example.net", queue_id=result.id)
    # the hop saw ada's own transaction, with ada's own return path and the From: untouched
    [arrival] = hop.received
    assert arrival.rcpt_tos == ["ada@example.net"]
    assert ReturnPaths(BOUNCE_DOMAIN, key).delivery_id(arrival.mail_from) == ada.delivery_id
    assert b"From: Shop <app@shop.example>" in arrival.content
    assert "sender non-delivery notification" in log
    assert f"relay=127.0.0.1[127.0.0.1]:{bounce_port}" in log and "status=sent" in log


async def recipients(app: AsyncPostlane, queue_id: str) -> dict[str, RecipientView]:
    view = await app.get(queue_id, history=True)
    return {r.address: r for r in view.recipients}


async def wait_for_state(app: AsyncPostlane, queue_id: str, address: str) -> RecipientView:
    """Poll until ``address`` leaves ``sent`` (Postfix's DSN arrived), up to the deadline."""
    deadline = time.monotonic() + DSN_DEADLINE
    while True:
        recipient = (await recipients(app, queue_id))[address]
        if recipient.state is not RecipientState.SENT or time.monotonic() > deadline:
            return recipient
        await asyncio.sleep(0.2)  # the poll interval, not a wait for something
