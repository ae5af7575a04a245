"""What every command shares: the ``--config`` and ``--debug`` it was given, the configuration
they load (once, when a command first needs it), and the event loop and application it runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from postlane.app import AsyncPostlane
from postlane.config import Config, load_config

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Invocation:
    """The root options of one ``postlane`` run, kept on click's context object."""

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.debug = False
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


def invocation() -> Invocation:
    """The running command's :class:`Invocation`."""
    return click.get_current_context().ensure_object(Invocation)


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(Invocation).config_path = value
    return value


def config_option(func: F) -> F:
    """``--config`` accepted after the command too (``postlane queue list --config x.toml``)."""
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


async def _with_app(action: Callable[[AsyncPostlane], Coroutine[Any, Any, T]]) -> T:
    async with AsyncPostlane(invocation().config()) as app:
        return await action(app)


def with_app(action: Callable[[AsyncPostlane], Coroutine[Any, Any, T]]) -> T:
    """Run ``action`` on the application (the store the configuration names), then close it."""
    return run_async(_with_app(action))
