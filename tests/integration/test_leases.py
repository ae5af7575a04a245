"""Lease owners that cannot be mistaken (audit finding 4): a live worker's leases are never
reclaimed, a provably dead one's are at once; a worker in another PID namespace on the same
host name (containers with host networking) cannot be proven dead from here, so it is left to
its lease."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postlane import leases
from postlane.app import AsyncPostlane
from postlane.clock import SystemClock
from postlane.leases import (
    boot_id,
    is_zombie,
    lease_owner_id,
    owner_is_dead,
    pid_namespace,
    process_start_ticks,
)
from postlane.message import Lane, Message, prepare
from postlane.metrics import Metrics
from postlane.policy import Policy
from postlane.store.sqlite import SQLiteStore
from postlane.transports import transport_for
from postlane.transports.capture import CaptureTransport
from postlane.worker import Worker
from tests.conftest import IN_CI, SMTPPeer, make_config
from tests.processes import start_postlane

T0 = 1_800_000_000.0


def test_this_process_is_alive_and_a_finished_one_is_dead() -> None:
    me = lease_owner_id()
    assert not owner_is_dead(me)
    child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = child.communicate()
    host, _pid, _start, boot, namespace, tag = me.split("/")
    gone = "/".join((host, out.strip(), "1", boot, namespace, tag))
    assert owner_is_dead(gone)


def test_a_killed_process_its_parent_has_not_collected_yet_is_dead() -> None:
    """After a kill -9 the pid stays a zombie until its parent waits for it (seen for seconds
    under a shell): it answers signals, but holds nothing any more."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host, _pid, _start, boot, namespace, tag = lease_owner_id().split("/")
        start = process_start_ticks(child.pid)
        owner = "/".join((host, str(child.pid), str(start), boot, namespace, tag))
        assert not owner_is_dead(owner)
        child.kill()
        deadline = time.monotonic() + 10
        while not is_zombie(child.pid):  # not waited for: a zombie
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        assert owner_is_dead(owner)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "part",
    ["host", "boot", "namespace"],
)
def test_finding_4_a_process_of_another_host_boot_or_pid_namespace_is_never_proven_dead(
    part: str,
) -> None:
    host, _pid, start, boot, namespace, tag = lease_owner_id().split("/")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs here
    fields = {"host": host, "boot": boot, "namespace": namespace}
    fields[part] = "elsewhere"
    owner = "/".join((fields["host"], str(child.pid), start, fields["boot"],
                      fields["namespace"], tag))  # fmt: skip
    assert not owner_is_dead(owner)
    assert not owner_is_dead(f"{host}/{child.pid}/{start}/{tag}")  # an older format: its lease


def test_the_owner_names_this_boot_and_pid_namespace() -> None:
    host, pid, _start, boot, namespace, _tag = lease_owner_id().split("/")
    assert host == socket.gethostname() and int(pid) == os.getpid()
    assert boot == boot_id() and namespace == pid_namespace() and boot and namespace


async def test_a_restart_says_how_many_deliveries_it_took_back_and_that_they_may_repeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's audit: after kill -9 and a restart, the log said only "reclaimed leases
    of 1 stopped process(es)", not how many recipients came back nor that they may get the
    message twice (what docs/observability.md tells operators to look for)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import os; print(os.getpid())", stdout=subprocess.PIPE
    )
    out, _ = await child.communicate()
    host, _pid, _start, boot, namespace, tag = lease_owner_id().split("/")
    killed = "/".join((host, out.decode().strip(), "1", boot, namespace, tag))  # gone
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    try:
        messages = [
            prepare(Message(sender="a@example.com", to=[f"u{n}@example.net"], text="x"),
                    max_size=10**6)
            for n in range(3)
        ]  # fmt: skip
        now = time.time()
        await store.enqueue(messages, now)
        lanes = [(lane, 0) for lane in Lane]
        claimed = await store.claim_due(killed, lanes, limit=10, now=now, lease_until=now + 60)
        assert len(claimed) == 3
        restarted = Worker(store, CaptureTransport(tmp_path / "captured"),
                           Policy.from_config(make_config(tmp_path)))  # fmt: skip
        assert await restarted.reclaim_dead_owners() == 3
    finally:
        await store.close()
    [said] = [r.getMessage() for r in caplog.records if "stopped process" in r.getMessage()]
    assert said == (
        "3 delivery(ies) returned from 1 stopped process(es) on this host that had not "
        "recorded a result: those recipients may get the message twice"
    )


async def test_a_restart_says_leases_that_lapsed_for_what_they_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade audit: leases of an older postlane (its owner names carry no host) that had
    run out were said to come "from 0 stopped process(es) on this host"."""
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    try:
        message = prepare(Message(sender="a@example.com", to=["u@example.net"], text="x"),
                          max_size=10**6)  # fmt: skip
        now = time.time()
        await store.enqueue([message], now - 120)
        lanes = [(lane, 0) for lane in Lane]
        claimed = await store.claim_due("w-1234", lanes, limit=10, now=now - 120,
                                        lease_until=now - 60)  # fmt: skip
        assert len(claimed) == 1
        restarted = Worker(store, CaptureTransport(tmp_path / "captured"),
                           Policy.from_config(make_config(tmp_path)))  # fmt: skip
        assert await restarted.reclaim_dead_owners() == 1
    finally:
        await store.close()
    [said] = [r.getMessage() for r in caplog.records if "returned" in r.getMessage()]
    assert said.startswith("1 delivery(ies) returned whose leases had lapsed")


def can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


async def test_finding_4_a_worker_in_another_pid_namespace_keeps_its_leases(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    """The audit's finding: a worker in its own PID namespace, on the same host name, had its
    in-flight leases "reclaimed" by a serve starting beside it, and its mail sent twice."""
    if not can_unshare():
        if IN_CI:
            pytest.fail("CI runs as root with unshare: this test must run there")
        pytest.skip("needs `unshare --pid --fork` (root, util-linux)")
    smtp_peer.handler.data_delay = 60.0  # the worker's sends stay in flight
    database = tmp_path / "queue.db"
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{database}"\n'
        f'[delivery]\nrelay = "{smtp_peer.url}"\nlease = "30s"\nshutdown_grace = "1s"\n'
    )
    store = SQLiteStore(database)
    await store.open()
    try:
        messages = [
            prepare(
                Message(sender="app@example.com", to=[f"u{n}@example.net"], text="x"),
                max_size=10**6,
            )
            for n in range(3)
        ]
        await store.enqueue(messages, SystemClock().now())
        worker_process = start_postlane(
            "worker",
            config=tmp_path / "postlane.toml",
            log=tmp_path / "worker.log",
            wrapper=("unshare", "--pid", "--fork", "--mount-proc"),
        )
        async with worker_process:

            async def leased() -> bool:
                return bool(await store.lease_owners())

            await worker_process.wait_until(leased, "the worker's sends in flight")
            [owner] = await store.lease_owners()
            assert owner.split("/")[4] != pid_namespace()  # it is in another namespace
            # a serve (or worker) starting beside it, in this namespace, on this host
            beside = Worker(store, CaptureTransport(tmp_path / "captured"),
                            Policy.from_config(make_config(tmp_path)))  # fmt: skip
            assert await beside.reclaim_dead_owners() == 0
            assert await store.lease_owners() == [owner]  # still the live worker's
            await asyncio.sleep(0)
    finally:
        await store.close()


class ShiftedClock(SystemClock):
    """This host's clock, off by ``offset`` seconds (NTP stopped, a VM resumed)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


async def test_a_worker_says_when_its_clock_is_off_from_the_databases(
    pg_schema: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leases are compared with the clocks of the hosts that claim and reap them: a host 30 s
    ahead of the others takes their deliveries 30 s early. A worker compares its clock with
    the database server's in housekeeping: off by more than a second, it says so (once, not
    at every check), and once more when it is right again; ``/metrics`` shows it."""
    monkeypatch.setattr(leases, "CLOCK_CHECK_INTERVAL", 0.05)
    clock = ShiftedClock(30.0)
    config = make_config(tmp_path, store={"url": pg_schema})
    async with AsyncPostlane(config, clock=clock) as app:
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if "clock is" in r.getMessage()]

        async def until(count: int) -> None:
            deadline = time.monotonic() + 20
            while len(said()) < count:
                assert not running.done(), running
                assert time.monotonic() < deadline, said()
                await asyncio.sleep(0.02)

        await until(1)
        metrics = Metrics(app=app)
        exposed = (await metrics.exposition()).decode()
        clock.offset = 0.0
        await until(2)
        stop.set()
        await running
        await worker.transport.close()
    ahead, back = said()
    assert ahead.startswith("this host's clock is 30.0 s ahead of the database's")
    assert "synchronise the clocks (NTP)" in ahead
    assert back.startswith("this host's clock is within 0.")
    [skew] = [line for line in exposed.splitlines() if line.startswith("postlane_clock_skew")]
    assert 29 < float(skew.split()[-1]) < 31
