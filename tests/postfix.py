"""A private Postfix instance for the tests that need a real MTA on either side of postlane.

The instance has its own configuration and queue directory (``postfix -c DIR start``), listens
on a free port on 127.0.0.1 only, and routes with ``transport_maps``: nothing leaves the
machine and the system's Postfix (if any) is untouched. Its directories are made with mkdtemp
and opened to the ``postfix`` user, not under pytest's tmp_path, whose parents are 0700 (the
daemons drop root and must reach their queue). Needs Postfix and root: :data:`WHY_NOT` says why
not when they are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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

    def __init__(
        self, root: Path, port: int, routes: dict[str, int], *, relay_domains: str = ""
    ) -> None:
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
            "relay_domains": relay_domains,
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
