"""What every command shares: the ``--config``, ``--debug`` and ``--verbose`` it was given, the
configuration they load (once, when a command first needs it, and checked whole), and the event
loop and application it runs on."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click

from postlane.app import AsyncPostlane
from postlane.cli.output import first
from postlane.config import Config, load_config
from postlane.errors import ConfigError, NoQueue

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Invocation:
    """The root options of one ``postlane`` run, kept on click's context object."""

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.debug = False
        #: say which configuration and which store the command uses (on stderr)
        self.verbose = False
        self._config: Config | None = None

    def config(self) -> Config:
        """The configuration, loaded and checked the first time: every key, and the transports
        its relays describe (built, not connected), so a command fails on what ``serve`` would
        fail on. Call it outside the event loop."""
        if self._config is None:
            config = load_config(self.config_path)
            check_transports(config)
            if self.verbose:
                click.echo(f"configuration: {config.source}", err=True)
            self._config = config
        return self._config


def check_transports(config: Config) -> None:
    """Build the transports of ``[delivery] relay`` and ``[[routes]]`` as a worker would (their
    URLs, credentials and options checked; nothing is connected), read the DKIM keys, and
    close them: a ConfigError naming the key, its secrets masked, for what they refuse."""
    from postlane.transports import Transport, transport_for

    built: list[Transport] = []
    try:
        if config.dkim:  # read even when this relay does not sign (capture, the APIs)
            from postlane.dkim import DkimSigner  # (slow to import: only when needed)

            DkimSigner.from_config(config.dkim, base_dir=config.base_dir).close()
        # each relay alone first: a provider's error says "delivery.relay", whichever it was
        for where, relay in _relays(config):
            alone = dataclasses.replace(
                config, delivery=dataclasses.replace(config.delivery, relay=relay), routes=()
            )
            try:
                built.append(transport_for(alone))
            except ConfigError as exc:
                raise ConfigError(exc.message.replace("delivery.relay", where, 1)) from None
        built.append(transport_for(config))
    except ConfigError as exc:
        raise ConfigError(config.redact(exc.message)) from None
    finally:
        asyncio.run(_close(built))


def _relays(config: Config) -> list[tuple[str, str]]:
    """Every relay URL of the configuration, with the key that gives it."""
    relays = [("delivery.relay", config.delivery.relay)]
    for number, route in enumerate(config.routes, 1):
        relays.append((f"routes[{number}].relay", route.relay))
        if route.fallback:
            relays.append((f"routes[{number}].fallback", route.fallback))
    return relays


async def _close(transports: list[Any]) -> None:
    await asyncio.gather(*(transport.close() for transport in transports))


def invocation() -> Invocation:
    """The running command's :class:`Invocation`."""
    return click.get_current_context().ensure_object(Invocation)


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(Invocation).config_path = value
    return value


def _remember_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(Invocation).verbose = True
    return value


def config_option(func: F) -> F:
    """``--config`` and ``-v`` accepted after the command too (``postlane queue list --config
    x.toml -v``)."""
    func = click.option(
        "-v",
        "--verbose",
        "verbose_after",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_remember_verbose,
        help="Say which configuration and store are used (on stderr).",
    )(func)
    return click.option(
        "--config",
        "config_after",
        metavar="PATH",
        expose_value=False,
        is_eager=True,
        callback=_remember_config,
        help="Configuration file (also accepted before the command).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(
        func
    )


def limit_option(default: int, *, most: int = 10_000) -> Callable[[F], F]:
    """``--limit``: how many rows a listing shows, ``default`` unless told, ``most`` at most."""
    return click.option("--limit", default=default, show_default=True, type=click.IntRange(1, most))


def setup_logging() -> None:
    """Logging as ``[log]`` says, debug included with ``--debug``."""
    from postlane.logs import setup_logging

    current = invocation()
    setup_logging(current.config().log, debug=current.debug)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (a third less CPU per message than asyncio's own
    loop, measured with benchmarks/deliver.py), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _with_app(
    config: Config,
    action: Callable[[AsyncPostlane], Coroutine[Any, Any, T]],
    *,
    create: bool,
    verbose: bool,
) -> T:
    app = AsyncPostlane(config, create=create)
    if verbose:
        click.echo(f"store: {app.store.description}", err=True)
    try:
        await app.open()
    except NoQueue as exc:
        if config.from_file:
            raise
        raise NoQueue(
            f"{exc.message}; if postlane runs elsewhere, run where its postlane.toml is, or "
            "give --config"
        ) from None
    async with app:
        return await action(app)


def with_app(
    action: Callable[[AsyncPostlane], Coroutine[Any, Any, T]], *, create: bool = False
) -> T:
    """Run ``action`` on the application (the store the configuration names), then close it.
    The store must exist (a command run from the wrong directory must not start a new, empty
    queue there): only ``create=True`` (``serve``, ``worker``, ``send`` on a configuration
    file) makes one."""
    current = invocation()
    config = current.config()
    return run_async(_with_app(config, action, create=create, verbose=current.verbose))


def read_first(
    read: Callable[[AsyncPostlane, int], Coroutine[Any, Any, Sequence[T]]], limit: int, what: str
) -> Sequence[T]:
    """The first ``limit`` rows a listing reads with ``read(app, n)``, asked for one more than
    that so that :func:`~postlane.cli.output.first` can say on stderr when more match (each
    listing would otherwise repeat the ``limit + 1``)."""
    return first(with_app(lambda app: read(app, limit + 1)), limit, what)
