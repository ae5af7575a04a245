"""``postlane serve --processes N``: a supervisor and N serve processes on the same ports.

The supervisor (the process the operator started) opens the store once (creating or migrating
it, so N processes never race to), binds the listening sockets once (``[http] listen``,
``[smtp] listen``, ``[bounces] listen``), and starts N copies of ``postlane serve`` that inherit
them. Each child is the whole of serve (HTTP API and dashboard, SMTP submission, the bounce
listener, a worker with its own lease owner) and accepts on the shared sockets: the kernel gives
each new connection to one child.

Why inherited sockets rather than ``SO_REUSEPORT`` (each child binding its own): the port is
bound once, by a process that lives as long as the service, so a restarted child can never fail
to bind or race another program for the port; connections waiting in the accept queue are not
reset when a child dies (with ``SO_REUSEPORT`` the dying child's queue is dropped); and it works
wherever a descriptor can be inherited, not only on Linux.

What the children share:

- the store: each opens its own connections to the one SQLite file or PostgreSQL database; the
  queue, the leases and the destination limits live there (``[destinations.NAME]`` limits hold
  for all processes together);
- the metrics: counters and histograms are written to files in a fresh directory
  (``PROMETHEUS_MULTIPROC_DIR``, removed at the end) and any child's ``/metrics`` adds up all of
  them; gauges read from the store are read once per scrape, not once per process;
- one alert evaluator: process 0 records the history and evaluates ``[alerts]``.

A child that dies is started again (at once after a long run, then with a doubling delay up to
:data:`MAX_RESTART_DELAY` while it keeps dying young), and the new child reclaims at once the
leases of the dead one (:func:`postlane.leases.owner_is_dead`). SIGTERM or SIGINT to the
supervisor sends SIGTERM to every child, waits for them (``[delivery] shutdown_grace`` and
:data:`STOP_MARGIN`), kills what is left, and exits 0 when every child stopped cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from postlane.config import Config

log = logging.getLogger("postlane.supervisor")

#: the environment variable prometheus_client's multiprocess mode reads (at import)
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: a child that ran this long before dying is restarted at once
STABLE_AFTER = 30.0
#: the first delay before restarting a child that died young, doubled each time it does again
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: beyond ``[delivery] shutdown_grace``: time for the children to hand back their leases and
#: close the store after their in-flight sends
STOP_MARGIN = 10.0


@dataclasses.dataclass(frozen=True)
class ProcessSlot:
    """Which of the supervisor's children a serve process is: ``index`` of ``count`` (process 0
    runs the alert evaluator)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> ProcessSlot:
        """``"1/4"`` -> ProcessSlot(1, 4); ValueError otherwise."""
        index_text, sep, count_text = text.partition("/")
        index, count = int(index_text), int(count_text)
        if not sep or not 0 <= index < count:
            raise ValueError(f"expected INDEX/COUNT, got {text!r}")
        return cls(index, count)


def bind_listeners(config: Config) -> dict[str, socket.socket]:
    """The listening sockets of serve, bound once for all the children: ``http``, ``smtp`` and,
    with ``[bounces] domain``, ``bounces``. A ConfigError naming the setting if one cannot be."""
    from postlane.ingest.server import bind

    wanted = [
        ("http", config.http.listen, "http.listen"),
        ("smtp", config.smtp.listen, "smtp.listen"),
    ]
    if config.bounces.domain is not None:
        wanted.append(("bounces", config.bounces.listen, "bounces.listen"))
    sockets: dict[str, socket.socket] = {}
    try:
        for name, listen, key in wanted:
            sockets[name] = bind(listen, key)
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def inherited_sockets(descriptors: Mapping[str, int]) -> dict[str, socket.socket]:
    """In a child: the supervisor's listening sockets, by name, from their descriptors."""
    sockets = {}
    for name, fd in descriptors.items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets[name] = sock
    return sockets


def parse_descriptors(values: Sequence[str]) -> dict[str, int]:
    """``["http=5", "smtp=6"]`` -> {"http": 5, "smtp": 6}; ValueError otherwise."""
    found = {}
    for value in values:
        name, sep, fd = value.partition("=")
        if not sep or name not in ("http", "smtp", "bounces") or not fd.isdigit():
            raise ValueError(f"expected NAME=FD, got {value!r}")
        found[name] = int(fd)
    return found


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class Supervisor:
    """Runs ``processes`` children of ``command`` (``postlane ... serve``) on ``sockets`` until
    SIGTERM or SIGINT; see the module's docstring."""

    def __init__(
        self,
        command: Sequence[str],
        sockets: Mapping[str, socket.socket],
        processes: int,
        *,
        grace: float,
        metrics_dir: Path,
    ) -> None:
        self.command = list(command)
        self.sockets = dict(sockets)
        self.processes = processes
        #: how long the children may take to stop before they are killed
        self.grace = grace
        self.metrics_dir = metrics_dir
        self.children: dict[int, asyncio.subprocess.Process] = {}
        #: children that did not stop cleanly when asked to (killed, or a non-zero status)
        self.unclean = 0
        self._stop = asyncio.Event()

    def child_command(self, index: int) -> list[str]:
        fds = [f"{name}={sock.fileno()}" for name, sock in self.sockets.items()]
        slot = ProcessSlot(index, self.processes)
        return [
            *self.command,
            "--process-slot",
            str(slot),
            *(part for fd in fds for part in ("--listen-fd", fd)),
        ]

    def child_environment(self) -> dict[str, str]:
        return {**os.environ, METRICS_DIR_VARIABLE: str(self.metrics_dir)}

    async def run(self) -> int:
        """Until a stop is asked for; 0 when every child stopped cleanly, else 1."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        try:
            slots = [
                asyncio.create_task(self._keep_running(index), name=f"postlane-process-{index}")
                for index in range(self.processes)
            ]
            log.info(
                "supervising %d serve processes (supervisor pid %d)", self.processes, os.getpid()
            )
            await self._stop.wait()
            await self._stop_children(slots)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("all serve processes stopped")
        return 0 if self.unclean == 0 else 1

    def _request_stop(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping the serve processes", sig.name)
        self.stop()

    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL past the grace); :meth:`run` returns."""
        self._stop.set()

    async def _keep_running(self, index: int) -> None:
        """One child slot: start the child, wait for it, start it again if it died."""
        young_deaths = 0
        while not self._stop.is_set():
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(
                *self.child_command(index),
                stdin=subprocess.DEVNULL,
                pass_fds=[sock.fileno() for sock in self.sockets.values()],
                env=self.child_environment(),
            )
            self.children[index] = child
            log.info("serve process %d started (pid %d)", index, child.pid)
            status = await child.wait()
            self._forget_metrics_of(child.pid)
            if self._stop.is_set():
                if status != 0:
                    self.unclean += 1
                    log.warning(
                        "serve process %d (pid %d) %s", index, child.pid, _describe_exit(status)
                    )
                return
            young_deaths = young_deaths + 1 if time.monotonic() - started < STABLE_AFTER else 0
            delay = (
                0.0
                if young_deaths == 0
                else min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** (young_deaths - 1))
            )
            log.warning(
                "serve process %d (pid %d) %s; starting it again%s",
                index,
                child.pid,
                _describe_exit(status),
                f" in {delay:g} s" if delay else "",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    async def _stop_children(self, slots: list[asyncio.Task[None]]) -> None:
        for child in self.children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        _, pending = await asyncio.wait(slots, timeout=self.grace)
        if pending:
            for index, child in self.children.items():
                if child.returncode is None:
                    log.warning(
                        "serve process %d (pid %d) did not stop within %g s: killing it",
                        index,
                        child.pid,
                        self.grace,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
            await asyncio.wait(pending)

    def _forget_metrics_of(self, pid: int) -> None:
        """A dead child's live gauges leave the sums (its counters stay: what it counted
        happened)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]


def child_command(config_path: str | None, *, debug: bool) -> list[str]:
    """``postlane [--config PATH] [--debug] serve`` with this interpreter: what each child runs
    (the supervisor adds its slot and the listening sockets)."""
    return [
        sys.executable,
        "-m",
        "postlane",
        *(["--config", config_path] if config_path is not None else []),
        *(["--debug"] if debug else []),
        "serve",
    ]


async def _prepare_store(config: Config) -> None:
    """Create or migrate the store once, before the children open it side by side."""
    from postlane.app import AsyncPostlane

    async with AsyncPostlane(config, create=True):
        pass


def supervise(config: Config, processes: int, command: Sequence[str]) -> int:
    """Run ``processes`` serve processes of ``command`` until SIGTERM or SIGINT; the exit
    status for the supervisor."""
    from postlane.auth import Tokens

    Tokens.from_config(config.http)  # a short token is refused before anything is started
    asyncio.run(_prepare_store(config))
    sockets = bind_listeners(config)
    metrics_dir = Path(tempfile.mkdtemp(prefix="postlane-metrics-"))
    try:
        supervisor = Supervisor(
            command,
            sockets,
            processes,
            grace=config.delivery.shutdown_grace + STOP_MARGIN,
            metrics_dir=metrics_dir,
        )
        return asyncio.run(supervisor.run())
    finally:
        for sock in sockets.values():
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
