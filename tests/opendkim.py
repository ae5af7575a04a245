"""OpenDKIM's verifier, ``opendkim-testmsg`` (Debian's opendkim-tools), run on what postlane
signs: a DKIM implementation nobody here wrote, beside dkimpy's.

opendkim-testmsg verifies the signatures of the message on its stdin and prints nothing when
they hold. It looks keys up through the C library's resolver, which asks the name servers of
``/etc/resolv.conf`` on port 53 and nowhere else. So :func:`verify` runs it inside new user,
mount and network namespaces (``unshare``): there 127.0.0.1:53 is free and ours, a bind mount
puts a resolv.conf naming it over ``/etc/resolv.conf``, and a
:class:`~tests.dns_server.DNSServer` answers with the published records. Nothing outside the
namespaces changes. ``python -m tests.opendkim FOLDER COUNT`` is the part that runs inside.
"""

from __future__ import annotations

import fcntl
import functools
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.dns_server import DNSServer

ROOT = Path(__file__).resolve().parent.parent
#: Debian installs it in /usr/sbin, which is not on every user's PATH
TESTMSG = shutil.which("opendkim-testmsg") or shutil.which(
    "opendkim-testmsg", path="/usr/sbin:/usr/local/sbin"
)
#: what precedes the inside part's report (without it, the harness itself failed)
REPORT_MARK = "opendkim-testmsg verdicts: "


@dataclass(frozen=True)
class Verdict:
    """opendkim-testmsg's answer: exit status 0 and nothing printed when the signature holds."""

    passed: bool
    #: what it printed, e.g. ``opendkim-testmsg: dkim_eom(): Bad signature``
    output: str


def unavailable() -> str | None:
    """Why :func:`verify` cannot run on this machine, or None when it can."""
    if TESTMSG is None:
        return "needs opendkim-testmsg (apt-get install opendkim-tools)"
    if _namespaces() is None:
        return "needs unshare (util-linux) allowed to make network and mount namespaces"
    return None


def verify(messages: Sequence[bytes], records: Mapping[str, str]) -> list[Verdict]:
    """opendkim-testmsg's verdict on each of ``messages`` (one run each, in one set of
    namespaces), finding keys among ``records``, the TXT records published:
    ``{"s1._domainkey.example.com": "v=DKIM1; k=rsa; p=..."}``."""
    namespaces = _namespaces()
    assert TESTMSG is not None and namespaces is not None, unavailable()
    with tempfile.TemporaryDirectory() as folder:
        resolv_conf = Path(folder) / "resolv.conf"
        resolv_conf.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
        zone = {name: {"TXT": [value]} for name, value in records.items()}
        (Path(folder) / "zone.json").write_text(json.dumps(zone))
        for number, message in enumerate(messages):
            (Path(folder) / f"{number}.eml").write_bytes(message)
        inside = [sys.executable, "-m", "tests.opendkim", folder, str(len(messages))]
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        run = subprocess.run(
            [*namespaces, "sh", "-c", script, str(resolv_conf), *inside],
            capture_output=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    output = run.stdout.decode(errors="replace")
    if REPORT_MARK not in output:
        stderr = run.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"the opendkim harness failed (exit {run.returncode}): {stderr}")
    report = json.loads(output.rpartition(REPORT_MARK)[2])
    return [Verdict(status == 0 and not printed, printed) for status, printed in report]


@functools.cache
def _namespaces() -> list[str] | None:
    """The ``unshare`` command that works here: as any user with user namespaces, else as root."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for command in (
        [unshare, "--user", "--map-root-user", "--net", "--mount"],
        [unshare, "--net", "--mount"],
    ):
        try:
            probe = subprocess.run([*command, "true"], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return command
    return None


def _loopback_up() -> None:
    """A new network namespace's loopback interface starts down: SIOCSIFFLAGS with IFF_UP."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh22x", b"lo", flags | iff_up))


def _answer(server: DNSServer, sock: socket.socket) -> None:
    while True:
        wire, address = sock.recvfrom(65535)
        reply = server.answer(wire)
        if reply is not None:
            sock.sendto(reply, address)


def _inside(folder: Path, count: int) -> None:
    """In the namespaces: serve the zone on 127.0.0.1:53, run opendkim-testmsg on each message,
    report each exit status and what it printed."""
    assert TESTMSG is not None
    _loopback_up()
    server = DNSServer(json.loads((folder / "zone.json").read_text()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    threading.Thread(target=_answer, args=(server, sock), daemon=True).start()
    report = []
    for number in range(count):
        with (folder / f"{number}.eml").open("rb") as message:
            run = subprocess.run([TESTMSG], stdin=message, capture_output=True, timeout=30)
        report.append((run.returncode, (run.stdout + run.stderr).decode(errors="replace").strip()))
    print(REPORT_MARK + json.dumps(report), flush=True)


if __name__ == "__main__":
    _inside(Path(sys.argv[1]), int(sys.argv[2]))
