"""postlane commands (``serve``, ``worker``, ``worker --burst``, ...) in subprocesses, for the tests
that need real processes and for the benchmarks.

One way to start them (this interpreter's ``-m postlane.cli``, output to a log file: a pipe nobody
reads would fill up and block the child), one way to wait for them (poll with a deadline, failing
at once with the log if the process dies meanwhile), one way to stop them (SIGTERM, then SIGKILL
past a deadline) and the log shown whenever something fails::

    async with start_postlane("worker", config=config, log=tmp_path / "worker.log") as worker:
        await worker.wait_until(lambda: len(received) >= 100, "a hundred deliveries")
        assert await worker.stop() == 0

Built on :class:`subprocess.Popen`, not on asyncio's subprocess transport, so that the same object
serves asyncio tests, synchronous fixtures (the browser tests) and the benchmark scripts: the
``*_blocking`` methods are the synchronous twins of the waiting ones. Nothing here imports pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType

#: how a postlane command is run: this interpreter (the test environment's), not whatever
#: ``postlane`` is first on PATH
POSTLANE = (sys.executable, "-m", "postlane.cli")
#: what ``serve`` and ``worker`` log once they deliver (and, for serve, listen)
RUNNING = "postlane is running"
#: how often a wait looks again
POLL_INTERVAL = 0.02
#: how much of a log a failure shows
LOG_TAIL = 4000

Condition = Callable[[], bool | Awaitable[bool]]


class ProcessFailed(AssertionError):
    """A postlane process exited, failed, or did not do something in time; the message ends with
    the tail of its log."""


def clean_environment(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``POSTLANE_*`` variables (a developer's
    ``POSTLANE_STORE_URL`` must not redirect a test's processes), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTLANE_")}
    env.update(overrides or {})
    return env


class PostlaneProcess:
    """A running (or finished) postlane command; see :func:`start_postlane`."""

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        popen: subprocess.Popen[bytes],
        *,
        log_start: int = 0,
        stop_timeout: float = 30.0,
        group: bool = False,
    ) -> None:
        self.args = tuple(args)
        #: signals go to its whole process group (started through a wrapper that does not pass
        #: them on, such as ``unshare --fork``)
        self.group = group
        self.log = log
        self.popen = popen
        #: where this run's output begins in ``log`` (several runs may append to one log)
        self.log_start = log_start
        #: how long a SIGTERM may take before it is a failure (and SIGKILL follows)
        self.stop_timeout = stop_timeout

    # -- state -----------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), None while it runs."""
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    def output(self) -> str:
        """Everything this process wrote (stdout and stderr, interleaved) so far."""
        try:
            data = self.log.read_bytes()[self.log_start :]
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")

    def describe(self) -> str:
        """The command, whether it runs, and the tail of its log: for failure messages."""
        state = "running" if self.running else f"exited with {self.returncode}"
        text = self.output()
        tail = text[-LOG_TAIL:] if text else "(nothing)"
        cut = "..." if len(text) > LOG_TAIL else ""
        return (
            f"`postlane {' '.join(self.args)}` (pid {self.pid}, {state}); {self.log}:\n{cut}{tail}"
        )

    def check_running(self) -> None:
        """Fail, with the log, if the process has exited."""
        if not self.running:
            raise ProcessFailed(f"exited unexpectedly: {self.describe()}")

    # -- waiting ---------------------------------------------------------------------------------

    def _waiting(self, what: str, timeout: float) -> Iterator[None]:
        """One step per poll until the caller returns; fails with the log when the process
        exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            yield
            if not self.running:
                raise ProcessFailed(f"exited while waiting for {what}: {self.describe()}")
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"timed out after {timeout}s waiting for {what}: {self.describe()}"
                )

    async def wait_until(
        self,
        condition: Condition,
        what: str,
        *,
        timeout: float = 30.0,
        ignoring: tuple[type[Exception], ...] = (),
        every: float = POLL_INTERVAL,
    ) -> None:
        """Poll ``condition`` (sync or async) every ``every`` seconds until it is true; fail with
        the log if the process exits first or ``timeout`` passes. Exceptions of the ``ignoring``
        types count as "not yet" (e.g. a connection refused before a server listens)."""
        for _ in self._waiting(what, timeout):
            if await _holds(condition, ignoring):
                return
            await asyncio.sleep(every)

    def wait_until_blocking(
        self,
        condition: Callable[[], bool],
        what: str,
        *,
        timeout: float = 30.0,
        ignoring: tuple[type[Exception], ...] = (),
        every: float = POLL_INTERVAL,
    ) -> None:
        """:meth:`wait_until` for synchronous callers."""
        for _ in self._waiting(what, timeout):
            try:
                if condition():
                    return
            except ignoring:
                pass
            time.sleep(every)

    def logged(self, text: str) -> bool:
        return text in self.output()

    async def wait_running(self, *, timeout: float = 30.0) -> None:
        """Until ``serve``/``worker`` says it is running (servers listening, worker started);
        needs the log level at ``info`` or lower."""
        await self.wait_until(lambda: self.logged(RUNNING), f"{RUNNING!r}", timeout=timeout)

    def wait_running_blocking(self, *, timeout: float = 30.0) -> None:
        self.wait_until_blocking(lambda: self.logged(RUNNING), f"{RUNNING!r}", timeout=timeout)

    async def wait_exit(self, *, timeout: float = 60.0) -> int:
        """Until the process exits, returning its status; past ``timeout`` it is killed and
        :class:`ProcessFailed` raised."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                self._kill_and_reap()
                raise ProcessFailed(
                    f"timed out after {timeout}s waiting for the process to exit: {self.describe()}"
                )
            await asyncio.sleep(POLL_INTERVAL)
        return self.popen.returncode

    def wait_exit_blocking(self, *, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_and_reap()
            raise ProcessFailed(
                f"timed out after {timeout}s waiting for the process to exit: {self.describe()}"
            ) from None

    # -- stopping --------------------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM, if it still runs: a graceful stop (leases handed back, servers closed)."""
        if self.running:
            self._signal(signal.SIGTERM)

    def _signal(self, number: int) -> None:
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, number)
        else:
            self.popen.send_signal(number)

    async def stop(self, *, timeout: float | None = None) -> int:
        """SIGTERM and the exit status; SIGKILL and :class:`ProcessFailed` if it has not stopped
        within ``timeout`` (default: :attr:`stop_timeout`)."""
        self.terminate()
        return await self.wait_exit(timeout=self.stop_timeout if timeout is None else timeout)

    def stop_blocking(self, *, timeout: float | None = None) -> int:
        self.terminate()
        return self.wait_exit_blocking(timeout=self.stop_timeout if timeout is None else timeout)

    async def kill(self) -> int:
        """SIGKILL (no chance to hand anything back) and the exit status."""
        if self.running:
            self._signal(signal.SIGKILL)
        return await self.wait_exit(timeout=30.0)

    def _kill_and_reap(self) -> None:
        if self.popen.poll() is None:
            self._signal(signal.SIGKILL)
            self.popen.wait()

    # -- as a context: stopped on the way out, its log attached to any failure -------------------

    async def __aenter__(self) -> PostlaneProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        except ProcessFailed as failed:
            if exc is None:
                raise
            exc.add_note(str(failed))
        else:
            if exc is not None:
                exc.add_note(self.describe())

    def __enter__(self) -> PostlaneProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_blocking()
        except ProcessFailed as failed:
            if exc is None:
                raise
            exc.add_note(str(failed))
        else:
            if exc is not None:
                exc.add_note(self.describe())


async def _holds(condition: Condition, ignoring: tuple[type[Exception], ...]) -> bool:
    try:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)
    except ignoring:
        return False


def start_postlane(
    *args: str,
    log: Path,
    config: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stop_timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> PostlaneProcess:
    """Start ``postlane [--config CONFIG] ARGS...`` with its stdout and stderr appended to
    ``log``, in ``cwd``, with :func:`clean_environment` (``env`` added). Returns at once: wait
    for what you need with :meth:`PostlaneProcess.wait_until` or ``wait_running``. Used as a
    context, it is stopped on the way out (SIGTERM, SIGKILL after ``stop_timeout``).
    ``wrapper``: a command that runs it (``unshare --pid --fork``: another PID namespace)."""
    command = [
        *wrapper,
        *POSTLANE,
        *(["--config", str(config)] if config is not None else []),
        *args,
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        start = out.tell()
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=clean_environment(env),
            start_new_session=bool(wrapper),
        )
    return PostlaneProcess(
        args, log, popen, log_start=start, stop_timeout=stop_timeout, group=bool(wrapper)
    )


async def run_postlane(
    *args: str,
    log: Path,
    config: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = True,
) -> PostlaneProcess:
    """Run a postlane command to its end (``worker --burst``, ``send``, ...); with ``check``,
    fail with its log unless it exits with 0."""
    process = start_postlane(*args, log=log, config=config, cwd=cwd, env=env)
    status = await process.wait_exit(timeout=timeout)
    if check and status != 0:
        raise ProcessFailed(f"failed: {process.describe()}")
    return process


async def stop_all(processes: Iterable[PostlaneProcess], *, timeout: float = 30.0) -> list[int]:
    """SIGTERM every process first, then wait for each: they stop side by side. Returns their
    exit statuses."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    return [await process.wait_exit(timeout=timeout) for process in processes]


@contextlib.asynccontextmanager
async def stopping(
    processes: Sequence[PostlaneProcess], *, timeout: float = 30.0
) -> AsyncIterator[Sequence[PostlaneProcess]]:
    """Several processes as one context: all stopped on the way out (:func:`stop_all`), and
    every one's log attached to a failure inside it."""
    try:
        yield processes
    except BaseException as exc:
        for process in processes:
            exc.add_note(process.describe())
        raise
    finally:
        await stop_all(processes, timeout=timeout)
