"""``postlane stats`` and ``postlane alerts``: how the queue is doing (qshape's view included),
and which alert rules fire now."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
from rich.text import Text

from postlane.app import QSHAPE_EDGES, AsyncPostlane
from postlane.cli.context import config_option, json_option, limit_option, with_app
from postlane.cli.output import age, listing, out, print_json, show
from postlane.clock import when
from postlane.message import Lane
from postlane.records import ShapeRow, Stats


@click.command()
@config_option
@click.option("--shape", is_flag=True, help="Age buckets by destination domain (qshape).")
@limit_option(50)
@json_option
def stats(shape: bool, limit: int, as_json: bool) -> None:
    """Depth and oldest age by lane, counts by state; --shape for where the backlog sits."""
    if shape:
        _print_shape(with_app(lambda app: app.shape(limit=limit)), as_json)
        return
    result, store = with_app(_stats_of_store)
    if as_json:
        # the contract's "ready": queued and due (the metrics' state="queued"); "scheduled":
        # queued for later; the table's "queued" column is both, as `--state queued` lists them
        print_json({**result.as_json(), "store": store})
        return
    columns = ("lane", "queued", "deferred", "held", "sending", "oldest")
    table = listing(*columns, right=set(columns[1:]))
    for lane in Lane:
        s = result.lanes[lane]
        table.add_row(
            lane.value,
            str(s.ready + s.scheduled),  # what `queue list --state queued` lists
            str(s.deferred),
            str(s.held),
            str(s.sending),
            age(s.oldest_age_seconds),
        )
    show(table)
    later = {lane.value: result.lanes[lane].scheduled for lane in Lane}
    if any(later.values()):
        counts = ", ".join(f"{n} {lane}" for lane, n in later.items() if n)
        out.print(f"of the queued, scheduled for later (not yet due): {counts}")
    out.print(
        f"sent {result.sent}   dead {result.dead}   suppressed {result.suppressed}   "
        f"suppression list {result.suppression_list}",
        markup=False,
    )
    if result.destinations:
        busy = listing("destination", "in flight", "rate/s", "paused until (UTC)", "why")
        for d in result.destinations:
            busy.add_row(
                d.destination,
                str(d.in_flight),
                "-" if d.rate is None else f"{d.rate:.1f}",
                when(d.paused_until),
                d.reason or "",
            )
        out.print()
        show(busy)
    out.print(f"store: {store}", markup=False)


async def _stats_of_store(app: AsyncPostlane) -> tuple[Stats, str]:
    return await app.stats(), app.store.description


def _print_shape(rows: Sequence[ShapeRow], as_json: bool) -> None:
    if as_json:
        print_json([row.as_json(QSHAPE_EDGES) for row in rows])
        return
    labels = [f"{int(e // 60)}" for e in QSHAPE_EDGES] + [f"{int(QSHAPE_EDGES[-1] // 60)}+"]
    # "later": scheduled mail, counted in T but in no age bucket (so each row adds up)
    table = listing("domain", "T", "later", *labels, right={"T", "later", *labels})
    totals = [sum(row.buckets[i] for row in rows) for i in range(len(labels))]
    table.add_row(
        "TOTAL",
        str(sum(r.total for r in rows)),
        str(sum(r.later for r in rows)),
        *map(str, totals),
        style="bold",
    )
    for row in rows:
        table.add_row(row.domain, str(row.total), str(row.later), *map(str, row.buckets))
    out.print("waiting recipients by domain and age in minutes (qshape; later: scheduled)")
    show(table)


@click.command("alerts")
@config_option
@click.option(
    "--prometheus-rules", "rules", is_flag=True, help="Print the rules as a Prometheus rules file."
)
@json_option
def alerts_command(rules: bool, as_json: bool) -> None:
    """Evaluate the alert rules now, on the recorded history (what serve records each minute)."""
    from postlane.alerts import AlertMonitor, evaluate, firing_first, history_needed
    from postlane.alerts import prometheus_rules as render

    if rules:
        click.echo(render(), nl=False)
        return

    async def go(app: AsyncPostlane) -> list[Any]:
        now = app.clock.now()
        history = await app.store.samples(now - history_needed())
        if not history or history[-1].at < now - now % 60:  # serve did not record this minute
            history = [*history, *await AlertMonitor(app).sample(now)]
        webhooks = await app.store.webhook_endpoints()  # their failures fire an alert too
        return firing_first(evaluate(history, now, webhooks=webhooks))

    verdicts = with_app(go)
    if as_json:
        print_json([a.as_json() for a in verdicts])
        return
    table = listing("state", "alert", "labels", "value", "detail")
    for alert in verdicts:
        state_text = Text("FIRING", style="bold red") if alert.firing else Text("ok", style="green")
        if alert.pending:  # holding, not yet for the rule's `for`
            state_text = Text("pending", style="yellow")
        labels = ",".join(f"{k}={v}" for k, v in alert.labels.items())
        table.add_row(state_text, alert.rule.name, labels, f"{alert.value:g}", alert.detail)
    show(table)
    firing = [a for a in verdicts if a.firing]
    if firing:
        out.print(f"{len(firing)} firing; runbooks:")
        for alert in firing:
            out.print(f"  {alert.rule.name}: {alert.rule.runbook_url}", markup=False)
