"""Who holds a lease: a name for this process that only this process can be, and the one case
where another process may end its leases at once.

A lease owner is ``host/pid/start/boot/pidns/random``: the host name, the pid and its start time
in clock ticks, this boot of the kernel, the PID namespace and a random tag. A restarted
``serve`` may reclaim at once the leases of a process that is provably dead: same host, same
kernel boot, same PID namespace, and that pid no longer runs (or runs a process that started at
another time). Anything else (another host, a container with its own PID namespace that shares
the host name, an owner written by an older postlane) cannot be proven dead from here, so its
deliveries wait for their lease to run out, which a live worker keeps renewing.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postlane.clock import Clock
    from postlane.store.base import Store

#: a host's clock this far from the database's is said in the log (a lease is compared with
#: the clock of whichever host claims or reaps it; NTP keeps hosts within milliseconds)
CLOCK_SKEW_WARNING = 1.0
#: how often a worker's housekeeping compares its clock with the database's, and how often a
#: clock still off is said again
CLOCK_CHECK_INTERVAL = 60.0
CLOCK_WARNING_REPEAT = 600.0

log = logging.getLogger("postlane.worker")


async def clock_skew(store: Store, clock: Clock) -> float | None:
    """How far ``clock`` (this process's, the one its leases are written with) is ahead of the
    database's, in seconds (negative: behind), taking the middle of the round trip as the
    moment the database read its own; None for a store that is this host's file."""
    before = clock.now()
    database = await store.database_clock()
    after = clock.now()
    return None if database is None else (before + after) / 2 - database


class ClockWatch:
    """Housekeeping's look at this host's clock beside the database's, every
    :data:`CLOCK_CHECK_INTERVAL`: a clock off by more than
    :data:`CLOCK_SKEW_WARNING` is said at once and every
    :data:`CLOCK_WARNING_REPEAT` while it lasts, and once more when it is right again."""

    def __init__(self) -> None:
        self._next = time.monotonic() + CLOCK_CHECK_INTERVAL
        self._said: float | None = None  # (monotonic) when a skew was last said

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def saw(self, skew: float | None) -> None:
        now = time.monotonic()
        self._next = now + CLOCK_CHECK_INTERVAL
        if skew is None:
            return
        if abs(skew) <= CLOCK_SKEW_WARNING:
            if self._said is not None:
                log.warning("this host's clock is within %.1f s of the database's again", abs(skew))
                self._said = None
            return
        if self._said is None or now - self._said >= CLOCK_WARNING_REPEAT:
            self._said = now
            log.warning(
                "this host's clock is %.1f s %s the database's: leases are compared with the "
                "clocks of the hosts that claim and reap them, so another host may take this "
                "one's deliveries early or late; synchronise the clocks (NTP)",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
            )


def lease_owner_id() -> str:
    """This process's name in leases."""
    pid = os.getpid()
    return "/".join(
        (
            socket.gethostname(),
            str(pid),
            str(process_start_ticks(pid)),
            boot_id(),
            pid_namespace(),
            os.urandom(3).hex(),
        )
    )


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command's name (Linux), [] when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 when unknown."""
    try:
        return int(_stat_fields(pid)[19])
    except (ValueError, IndexError):
        return 0


def is_zombie(pid: int) -> bool:
    """The process has ended and waits for its parent to collect it (state Z: its pid still
    answers signals, but it does nothing any more)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] == "Z"


@functools.cache
def boot_id() -> str:
    """This boot of the kernel ('' when unknown): pids and start ticks restart with it."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip().replace("-", "")[:16]
    except OSError:
        return ""


@functools.cache
def pid_namespace() -> str:
    """The PID namespace this process sees pids in ('' when unknown): the same pid number in
    another namespace (another container) is another process."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return link.removeprefix("pid:[").removesuffix("]")


def owner_is_dead(owner: str) -> bool:
    """True only when ``owner`` is provably a process that no longer runs: of this host, this
    boot and this PID namespace, and its pid is gone or belongs to a later process."""
    parts = owner.split("/")
    if len(parts) != 6:
        return False  # another format (an older postlane): its lease will run out
    host, pid_text, started_text, boot, namespace, _tag = parts
    if host != socket.gethostname() or not boot or not namespace:
        return False
    if boot != boot_id() or namespace != pid_namespace():
        return False
    try:
        pid, started = int(pid_text), int(started_text)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    if is_zombie(pid):  # killed, not yet collected by its parent (a supervisor, a shell)
        return True
    return started != 0 and process_start_ticks(pid) not in (0, started)
