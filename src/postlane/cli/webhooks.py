"""``postlane webhooks``: the application's webhook endpoints (``[[webhooks.out]]``): how each
fares, its recent failures, a test event, replay and resume, and a new secret."""

from __future__ import annotations

from typing import Any

import click

from postlane.app import AsyncPostlane
from postlane.cli.context import config_option, invocation, json_option, with_app
from postlane.cli.output import first_line, json_or_empty, listing, print_json, show
from postlane.errors import PostlaneError


@click.group()
def webhooks() -> None:
    """Webhook endpoints: the application hears what happened to its mail ([[webhooks.out]])."""


def _endpoints(app: AsyncPostlane) -> Any:
    endpoints = app.config.webhooks_out
    if not endpoints:
        raise PostlaneError(
            f"no webhook endpoint is configured ([[webhooks.out]] in {app.config.source})"
        )
    return endpoints


@webhooks.command("list")
@config_option
@json_option
def webhooks_list(as_json: bool) -> None:
    """Each endpoint: its state, place in the event log, failures in a row, next try."""
    from postlane.webhooks.operations import endpoint_statuses

    async def go(app: AsyncPostlane) -> list[dict[str, Any]]:
        endpoints = app.config.webhooks_out  # none: an empty listing, as every listing
        return await endpoint_statuses(app.store, endpoints, now=app.clock.now())

    statuses = with_app(go)
    empty = "No webhook endpoint is configured ([[webhooks.out]])"
    if json_or_empty(statuses, as_json=as_json, empty=empty):
        return
    table = listing(
        "endpoint", "state", "cursor", "lag", "failures", "next try", "delivered", "last error",
        right={"cursor", "failures", "delivered"},
    )  # fmt: skip
    for s in statuses:
        lag = s.get("lag_seconds")
        table.add_row(
            str(s["name"]),
            str(s["state"]),
            str(s.get("cursor") or "-"),
            "-" if lag is None else f"{lag:.0f}s",
            str(s.get("failures") or 0),
            str(s.get("next_attempt_at") or "-"),
            str(s.get("delivered") or 0),
            # kept after a recovery, for the operator: say when
            f"{s.get('last_error_at') or ''} {first_line(str(s.get('last_error') or ''))}".strip(),
        )
    show(table)


@webhooks.command("failures")
@config_option
@click.argument("name", required=False)
@json_option
def webhooks_failures(name: str | None, as_json: bool) -> None:
    """The recent failures of every endpoint, or of NAME, newest first."""
    from postlane.webhooks.operations import failures

    async def go(app: AsyncPostlane) -> list[dict[str, Any]]:
        # a listing: none configured is no failure; an endpoint named is looked for
        endpoints = _endpoints(app) if name is not None else app.config.webhooks_out
        return await failures(app.store, endpoints, name=name)

    found = with_app(go)
    if json_or_empty(found, as_json=as_json, empty="No failures"):
        return
    table = listing("at (UTC)", "endpoint", "outcome", "error")
    for failure in found:
        table.add_row(
            str(failure.get("at") or "-"),
            str(failure.get("endpoint")),
            str(failure.get("outcome") or "-"),
            first_line(str(failure.get("error") or "")),
        )
    show(table)


@webhooks.command("test")
@config_option
@click.argument("name")
@json_option
def webhooks_test(name: str, as_json: bool) -> None:
    """POST one signed `test` event to NAME now (nothing stored, no retry): does it answer 2xx
    and check the signature?"""
    from postlane.webhooks.endpoints import endpoint_named
    from postlane.webhooks.operations import send_test_event

    endpoint = endpoint_named(invocation().config().webhooks_out, name)
    result = with_app(lambda app: send_test_event(endpoint, now=app.clock.now()))
    if as_json:
        print_json(result.as_json())
    elif result.ok:
        click.echo(f"{name}: answered {result.status} in {result.seconds:.2f} s")
    if not result.ok:
        raise PostlaneError(f"{name}: the test event failed: {result.error or result.status}")


@webhooks.command("replay")
@config_option
@click.argument("name")
@click.option("--after", type=int, metavar="ID", help="Send again every event after this one.")
def webhooks_replay(name: str, after: int | None) -> None:
    """Send NAME the events after --after again (default: from the oldest kept): a running
    serve picks it up within a second."""
    from postlane.webhooks.operations import replay

    async def go(app: AsyncPostlane) -> None:
        await replay(app.store, _endpoints(app), name, after=after, now=app.clock.now())

    with_app(go)
    click.echo(f"{name}: replaying from {'the oldest event kept' if after is None else after}",
               err=True)  # fmt: skip


@webhooks.command("resume")
@config_option
@click.argument("name")
def webhooks_resume(name: str) -> None:
    """Try a failing or paused endpoint NAME at once, from where it is."""
    from postlane.webhooks.operations import resume

    async def go(app: AsyncPostlane) -> None:
        await resume(app.store, _endpoints(app), name, now=app.clock.now())

    with_app(go)
    click.echo(f"{name}: resumed", err=True)


@webhooks.command("secret")
def webhooks_secret() -> None:
    """Print a new signing secret (whsec_...) for a [[webhooks.out]] table."""
    from postlane.webhooks.endpoints import new_secret

    click.echo(new_secret())
