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
import os
import socket


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
