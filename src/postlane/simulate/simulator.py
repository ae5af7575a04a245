"""The simulator: a provider's SMTP server on the running event loop, and its report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from postlane.clock import Clock, SystemClock
from postlane.errors import ConfigError
from postlane.simulate.feedback import LateReports
from postlane.simulate.provider import Provider, ProviderSMTP
from postlane.simulate.replies import BANNER_PLACEHOLDERS, check_placeholders
from postlane.simulate.report import ReportCounts
from postlane.simulate.scenario import Scenario, reports_address
from postlane.simulate.tls import tls_context


class Simulator:
    """A provider simulator on the running event loop.

    ::

        async with Simulator(Scenario.load("bounces")) as simulator:
            host, port = simulator.address
            ...  # deliver to host:port
        print(simulator.report())

    ``reports_to`` (``"HOST:PORT"`` or a pair) overrides the scenario's ``reports_to``: where
    the DSNs and complaints of its stage "later" rules are delivered.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        seed: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        max_messages: int | None = None,
        reports_to: str | tuple[str, int] | None = None,
    ) -> None:
        if reports_to is not None:
            try:
                destination = (
                    reports_address(reports_to) if isinstance(reports_to, str) else reports_to
                )
            except ValueError as exc:
                raise ConfigError(f"reports_to: {exc}") from None
            scenario = replace(scenario, reports_to=destination)
        self.scenario = scenario.with_seed(seed)
        if self.scenario.seed is None:
            self.scenario = self.scenario.with_seed(random.SystemRandom().randrange(2**32))
        self.host = host
        self.port = port
        self.clock: Clock = clock or SystemClock()
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.max_messages = max_messages
        self._server: asyncio.Server | None = None
        self._stats: ReportCounts | None = None
        self._provider: Provider | None = None
        self._late: LateReports | None = None
        self._finished: asyncio.Event | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on, once started."""
        if self._address is None:
            raise RuntimeError("the simulator is not started")
        return self._address

    async def start(self) -> tuple[str, int]:
        """Listen; returns (host, port), the port chosen by the system if 0 was asked for."""
        scenario = self.scenario
        context = await asyncio.to_thread(tls_context, scenario)
        if self.store_dir is not None:
            try:
                self.store_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--store-dir {self.store_dir}: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        finished = self._finished = asyncio.Event()
        stats = self._stats = ReportCounts(self.clock)
        late = self._late = LateReports(scenario.reports_to, scenario.hostname, self.clock)
        provider = self._provider = Provider(
            scenario,
            random.Random(scenario.seed),
            self.clock,
            stats,
            store_dir=self.store_dir,
            max_messages=self.max_messages,
            on_limit=finished.set,
            late=late,
        )
        banner_templated = check_placeholders(scenario.banner, BANNER_PLACEHOLDERS)

        def factory() -> SMTP:
            stats.connections += 1
            # as long as a real provider's (Gmail's are 40 characters or so): a short one made
            # alike failures look different to the dead-letter grouping, which masks ids of 8
            # or more (1,200 identical bounces came out in 84 groups)
            session_id = f"{scenario.seed or 0:x}{stats.connections:08x}si{stats.connections}"
            banner = scenario.banner
            if banner_templated:
                banner = banner.format(
                    id=session_id,
                    hostname=scenario.hostname,
                    time=int(self.clock.now()),
                )
            return ProviderSMTP(
                provider,
                session_id,
                hostname=scenario.hostname,
                ident=banner,
                data_size_limit=scenario.max_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=context,
                loop=loop,
            )

        try:
            self._server = await loop.create_server(factory, self.host, self.port)
        except OSError as exc:
            raise ConfigError(
                f"--listen {self.host}:{self.port}: cannot listen ({exc.strerror or exc})"
            ) from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = (str(host), int(port))
        return self._address

    async def wait(self) -> None:
        """Until ``max_messages`` messages were accepted, or :meth:`stop` is called."""
        if self._finished is None:
            raise RuntimeError("the simulator is not started")
        await self._finished.wait()

    async def wait_for_reports(self) -> None:
        """Until every report scheduled so far (stage "later" rules) was delivered or given
        up on."""
        if self._late is None:
            raise RuntimeError("the simulator is not started")
        await self._late.wait()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop listening; give open sessions ``grace`` seconds to QUIT, then close them; send
        the reports still waiting at once (given up after a few seconds)."""
        server, provider = self._server, self._provider
        if server is None or provider is None:
            return
        self._server = None
        server.close()
        if grace > 0 and provider.sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(provider.idle.wait(), grace)
        sessions = list(provider.sessions)
        tasks = [s._handler_coroutine for s in sessions if s._handler_coroutine is not None]
        for session in sessions:
            if session.transport is not None:
                session.transport.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()
        if self._stats is not None:
            self._stats.stopped_at = self.clock.now()  # the rate is the SMTP service's
        if self._late is not None:
            await self._late.close()
        if self._finished is not None:
            self._finished.set()

    def report(self) -> dict[str, Any]:
        """What happened so far (see ``docs/simulator.md`` for the fields)."""
        scenario = self.scenario
        head: dict[str, Any] = {
            "scenario": scenario.name,
            "source": scenario.source,
            "seed": scenario.seed,
            "listen": None if self._address is None else "{}:{}".format(*self._address),
        }
        if self._stats is None or self._late is None:
            return head
        return head | self._stats.report() | {"reports": self._late.report()}

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def run_until_stopped(
    simulator: Simulator, duration: float | None, announce: Callable[[str, int], None]
) -> dict[str, Any]:
    """``postlane simulate``'s run: start, ``announce`` where it listens, serve until SIGINT or
    SIGTERM, ``duration`` seconds or the simulator's ``max_messages``; stop and report."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    # before listening: a client may connect, and a script signal, as soon as the port is open
    for signum in signals:
        loop.add_signal_handler(signum, interrupted.set)
    waiters: list[asyncio.Task[Any]] = []
    try:
        host, port = await simulator.start()
        announce(host, port)
        waiters = [
            asyncio.create_task(interrupted.wait()),
            asyncio.create_task(simulator.wait()),
        ]
        await asyncio.wait(waiters, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        for signum in signals:
            loop.remove_signal_handler(signum)
        # a client that got its last 250 usually says QUIT at once: let it
        await simulator.stop(grace=1.0)
    return simulator.report()
